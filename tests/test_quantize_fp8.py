"""quantization="fp8" and "fp8_block": the quantize_fp8 pass's sites on every architecture, and the compiled model
against the Hugging Face model whose linears this test fake-quantizes itself, in float64, as the numerics say
(custom_ops/linear/fp8.py: per-channel weight scales, per-token activation scales, e4m3 rounding; fp8_block.py:
the same rounding per 128 x 128 weight block and 1 x 128 activation group)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, VOCAB, tiny_model
from drop_in_models import nanogpt
from fp8_rounding import FP8_MAX, e4m3, e4m3_rows, e4m3_weight
from test_moe_experts import float64_fp8_experts

from autotune.select import graph_value
from compiled_llm import compile_model
from compiled_llm.verify import SelfCheckError
from fx_passes import DEFAULT_PIPELINE
from fx_passes.registry import PassResult, register_pass

MOE = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v2", "deepseek_v3")
MOE_LAYERS = {"deepseek_v2": 1, "deepseek_v3": 1}  # their first layer is dense
# Quantized linears of the 2-layer models the per-layer rule does not fit. DeepSeek-V3's multi-head latent attention:
# q_a and kv_a fused, q_b, o (kv_b is absorbed into the attention, a matmul of its weight in the model's dtype, as
# vLLM does); then layer 0's dense MLP (gate/up fused, down) and layer 1's shared expert's. fp8_block keeps q_a and
# kv_a apart, and the shared expert's gate and up too (32 rows each: parts of a 128-row block).
# DeepSeek-V2 (no query compression): q and kv_a fused, o.
LINEARS = {
    ("deepseek_v3", "fp8"): 2 * 3 + 2 * 2, ("deepseek_v3", "fp8_block"): 2 * 4 + 2 + 3,
    ("deepseek_v2", "fp8"): 2 * 2 + 2 * 2, ("deepseek_v2", "fp8_block"): 2 * 3 + 2 + 3,
}  # fmt: skip


def sites(compiled) -> int:
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_fp8"]
    return result.sites


OPS = {"fp8": torch.ops.compiled_llm.fp8_linear.default, "fp8_block": torch.ops.compiled_llm.fp8_block_linear.default}


@pytest.mark.parametrize("quantization", sorted(OPS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_decoder_linear_is_quantized_but_the_lm_head_and_routers(arch, quantization):
    """Per layer: the fused q/k/v and o projections, and the fused gate/up and down projections of a dense MLP
    (MoE experts are not linears in the graph; their routers stay in the model's dtype). 2 layers. With fp8_block
    q, k and v stay three linears: 64, 32 and 32 rows here, so a 128-row block would span two of them."""
    compiled = compile_model(tiny_model(arch), compile_backend="eager", quantization=quantization)
    per_layer = (2 if arch in MOE else 4) + (2 if quantization == "fp8_block" else 0)
    linears = LINEARS.get((arch, quantization), 2 * per_layer)
    experts = MOE_LAYERS.get(arch, 2) if arch in MOE and quantization == "fp8" else 0  # each: moe_experts_fp8
    assert sites(compiled) == linears + experts
    graph = compiled.graph_module.graph
    fp8_ops = [n for n in graph.nodes if n.target is OPS[quantization]]
    assert len(fp8_ops) == linears
    weights = [graph_value(compiled.graph_module, n.args[1]) for n in fp8_ops]
    assert all(w.dtype == torch.float8_e4m3fn for w in weights)


def test_quantize_lm_head_quantizes_the_last_linear_too():
    compiled = compile_model(tiny_model("llama"), compile_backend="eager", quantization="fp8", quantize_lm_head=True)
    assert sites(compiled) == 9


def fake_quantized(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The linear as fp8_linear defines it, written out in tests/fp8_rounding.py: x's rows and the weight rounded to
    e4m3 in float32, the product and sums in float64."""
    out = e4m3_rows(x) @ e4m3_weight(module.weight).t()
    if module.bias is not None:
        out = out + module.bias.double()
    return out.to(x.dtype)


def fake_block_quantized(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The linear as fp8_block_linear defines it, from the definition: e4m3 at max|values| / 448 (no clip search)
    for each 128 x 128 block of the weight and each token's 128-column group of x; the groups' partial products, each
    scaled, summed in float64."""

    def rounded(values: torch.Tensor) -> torch.Tensor:
        return e4m3(values, values.float().abs().amax().clamp(min=1e-12) * torch.tensor(1 / FP8_MAX))

    weight, rows = module.weight, x.reshape(-1, x.shape[-1])
    weight_blocks = torch.zeros(weight.shape, dtype=torch.float64)
    row_groups = torch.zeros(rows.shape, dtype=torch.float64)
    for i in range(0, weight.shape[0], 128):
        for j in range(0, weight.shape[1], 128):
            weight_blocks[i : i + 128, j : j + 128] = rounded(weight[i : i + 128, j : j + 128])
    for t in range(rows.shape[0]):
        for j in range(0, rows.shape[1], 128):
            row_groups[t, j : j + 128] = rounded(rows[t, j : j + 128])
    out = row_groups @ weight_blocks.t()
    if module.bias is not None:
        out = out + module.bias.double()
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "qwen3_moe", "llama-fp8_block"])
def test_logits_equal_the_fake_quantized_model(arch, monkeypatch):
    """The compiled fp8 model's logits equal HF's with every nn.Linear but the LM head (and, for fp8, the MoE experts)
    fake-quantized, to within
    float32 summation (a rounding that flips near an e4m3 boundary moves a logit by far less than the 6-10%
    that quantization itself moves it, which the float model's distance shows)."""
    arch, _, quantization = arch.partition("-")
    fake = fake_block_quantized if quantization == "fp8_block" else fake_quantized
    model = tiny_model(arch)
    compiled = compile_model(model, compile_backend="eager", quantization=quantization or "fp8")
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        float_logits = model(ids).logits
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                monkeypatch.setattr(module, "forward", lambda x, module=module: fake(module, x))
            if hasattr(module, "gate_up_proj"):  # MoE experts: e4m3 weights and GEMM inputs too (fp8 only)
                monkeypatch.setattr(module, "forward", lambda h, ids, w, module=module: float64_fp8_experts(
                    h, ids, w, module.gate_up_proj, module.down_proj).to(h.dtype))  # fmt: skip
        reference = model(ids).logits
        logits = compiled(ids).logits

    def distance(a):
        return ((a - reference).norm() / reference.norm()).item()

    assert distance(float_logits) > 0.02  # quantizing moved the logits: the comparison below can tell
    assert distance(logits) < 2e-3
    assert distance(logits) < distance(float_logits) / 20


@register_pass("test_misscale_an_fp8_weight")
def _misscale_an_fp8_weight(gm, config):
    """A wrong quantization: one fp8 weight's scales 10% too large."""
    name = next(n.args[2].target for n in gm.graph.nodes if n.target in OPS.values())
    getattr(gm, name).data *= 1.1
    return PassResult("test_misscale_an_fp8_weight", 1)


@pytest.mark.parametrize("quantization", sorted(OPS))
def test_the_self_check_holds_a_drop_in_module_to_its_quantized_self(quantization):
    """A module written outside HF is self-checked (verify): against its own forward with its nn.Linear layers
    rounded as the format's op rounds them, so a correct compile passes and a wrongly scaled weight does not."""
    compiled = compile_model(nanogpt(), compile_backend="eager", quantization=quantization)
    assert sites(compiled) == 8 and "self_check_s" in compiled.report.timings  # 2 layers x 4; the tied LM head kept
    after = DEFAULT_PIPELINE.index("quantize_fp8") + 1
    passes = (*DEFAULT_PIPELINE[:after], "test_misscale_an_fp8_weight", *DEFAULT_PIPELINE[after:])
    # float32: no position is off by more than a rounding flip would be, but every one is a little
    with pytest.raises(SelfCheckError, match=r"differs from the module itself \(.*every position but the furthest"):
        compile_model(nanogpt(), compile_backend="eager", quantization=quantization, passes=passes)


@pytest.mark.parametrize("quantization", sorted(OPS))
def test_fp8_through_inductor(quantization):
    model = tiny_model("llama")
    eager = compile_model(model, compile_backend="eager", quantization=quantization)
    inductor = compile_model(tiny_model("llama"), quantization=quantization)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected, got = eager(ids).logits, inductor(ids).logits
    assert sites(inductor) == (12 if quantization == "fp8_block" else 8)  # 2 layers: see the site-count test
    assert ((got - expected).norm() / expected.norm()).item() < 2e-3


def test_static_activation_scales_are_each_linears_calibrated_max(tmp_path):
    """activation_scheme="static": each quantized linear reads one input scale, max|x| / 448 over the calibration
    text's inputs of that linear (measured here with hooks on the module's linears),
    and the self-check holds the graph to the module rounding its inputs with those scales; a second compile reads
    them from the cache; the producer fusions leave static linears alone (their scale is not the norm's to compute)."""
    from fx_passes.calibration import calibration_sequences
    from fx_passes.registry import with_fp8_fusions

    model = tiny_model("llama")
    fields = {"quantization": "fp8", "activation_scheme": "static", "compile_backend": "eager", "cache_dir": tmp_path}
    compiled = compile_model(model, verify=True, passes=with_fp8_fusions(DEFAULT_PIPELINE), **fields)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_fp8"]
    assert "static activation scales: calibrated over" in result.detail
    assert compiled.report.pass_sites("fuse_norm_quantize_fp8") == compiled.report.pass_sites(
        "fuse_silu_mul_quantize_fp8") == 0  # fmt: skip
    gm = compiled.graph_module
    linears = [n for n in gm.graph.nodes if n.target is OPS["fp8"]]
    assert len(linears) == 8 and all(n.args[3] is not None for n in linears)
    measured = {}  # each linear's input: q_proj's is the fused q/k/v's, gate_proj's the fused gate/up's
    inputs_of = ("q_proj", "o_proj", "gate_proj", "down_proj")
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: measured.__setitem__(
        name, max(measured.get(name, 0.0), args[0].abs().max().item())))
        for name, module in model.named_modules() if name.endswith(inputs_of)]  # fmt: skip
    sequences, _ = calibration_sequences(None, VOCAB)
    with torch.no_grad():
        for ids in sequences:
            model(torch.tensor([ids]), use_cache=False)
    for hook in hooks:
        hook.remove()
    scales = sorted(graph_value(gm, n.args[3]).item() * FP8_MAX for n in linears)
    torch.testing.assert_close(scales, sorted(measured.values()), rtol=1e-5, atol=0)
    again = compile_model(tiny_model("llama"), **fields)
    (result,) = [p for p in again.report.passes if p.name == "quantize_fp8"]
    assert "static activation scales: from the cache" in result.detail
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, compiled(ids).logits)


def test_the_graph_reads_about_half_the_bytes_of_the_decoder_linears():
    """report.weight_bytes (bytes of the weights the graph reads): the decoder's bf16 linears at 1 byte a value
    plus a float32 scale a row, at most 0.55x; everything else (embeddings, norms, the LM head) unchanged."""
    model = tiny_model("llama").to(torch.bfloat16)
    linear_bytes = sum(p.nbytes for name, p in model.named_parameters()
                       if p.dim() == 2 and "embed" not in name and "lm_head" not in name)  # fmt: skip
    float_bytes = compile_model(model, compile_backend="eager").report.weight_bytes
    fp8_bytes = compile_model(tiny_model("llama").to(torch.bfloat16), compile_backend="eager",
                              quantization="fp8").report.weight_bytes  # fmt: skip
    parameters = sum(p.nbytes for p in model.parameters())
    assert parameters <= float_bytes <= parameters + sum(b.nbytes for b in model.buffers())  # e.g. RoPE's inv_freq
    assert fp8_bytes - (float_bytes - linear_bytes) <= 0.55 * linear_bytes
    assert fp8_bytes - (float_bytes - linear_bytes) >= 0.5 * linear_bytes  # the weights are still all there


@pytest.mark.gpu
def test_fp8_on_the_gpu_is_nearer_the_fake_quantized_model_than_the_float_one(monkeypatch):
    """Inductor, CUDA graphs and the triton backend (the quantizing kernel and the Triton decode GEMM, for the prompt's
    rows too) in bf16: closer to the fake-quantized model than to the float one. Not by as far as in float32: the
    compiled model's bf16 activations differ from HF's in their last bits, and each such difference can move an
    e4m3 rounding by a whole step (on an H200: 0.048 from the fake-quantized model, 0.091 from the float one)."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    compiled = compile_model(model, quantization="fp8")
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_fp8"]
    assert result.sites == 8
    if torch.cuda.get_device_capability() >= (8, 9):
        assert "triton: one quantizing kernel, then a Triton FP8 GEMM" in result.detail
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        float_logits = model(ids).logits.float()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                monkeypatch.setattr(module, "forward", lambda x, module=module: fake_quantized(module, x))
        reference = model(ids).logits.float()
        logits = compiled(ids).logits.float()

    def distance(a):
        return ((a - reference).norm() / reference.norm()).item()

    assert distance(logits) < distance(float_logits) / 1.5


@pytest.mark.gpu
def test_static_fp8_on_the_gpu_passes_the_self_check(own_cache_dir):
    """activation_scheme="static" under Inductor and CUDA graphs, the triton backend's static path (the quantizing
    kernel with the calibrated scale, saturating what is beyond it) held by the self-check in bf16."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    compiled = compile_model(model, quantization="fp8", activation_scheme="static", verify=True,
                             cache_dir=own_cache_dir)  # fmt: skip
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_fp8"]
    assert result.sites == 8 and "static activation scales: calibrated over" in result.detail
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        float_logits = model(ids).logits.float()
        relative = (compiled(ids).logits.float() - float_logits).norm() / float_logits.norm()
    assert relative < 0.1


def test_the_fp8_self_check_bound_passes_rounding_noise_and_fails_a_wrong_graph():
    """With FP8 activations each position is held by its RMS difference, relative to what quantizing moves this
    module by: noise of the size seen on a correct 32-layer graph (34% against 47%, H200) passes, logits that do not
    follow the reference (a wrong graph) fail, and so does a flipped decisive token."""
    from compiled_llm.verify import _mismatch, relative_rms

    generator = torch.Generator().manual_seed(0)
    expected = torch.randn(6, 1000, generator=generator)
    noisy = expected + 0.34 * torch.randn(6, 1000, generator=generator)
    assert relative_rms(noisy, expected).max() < 0.47
    assert _mismatch(noisy, expected, 1e-2, rms_bound=0.47) is None
    unrelated = torch.randn(6, 1000, generator=generator)
    assert "RMS difference" in _mismatch(unrelated, expected, 1e-2, rms_bound=0.47)
    decisive = expected.clone()
    decisive[2, 7] = 50.0  # far ahead of every other logit
    flipped = decisive.clone()
    flipped[2, 7], flipped[2, 8] = decisive[2, 8], 50.0
    assert "greedy token 8 vs 7" in _mismatch(flipped, decisive, 1e-2, rms_bound=0.47)


def test_wider_activations_allow_one_flipped_position_a_run_and_little_elsewhere():
    """Float32 and wider (one_flip): in a run, the position furthest from its bound may be twice off (a rare FP8
    rounding flip on a large activation), the others only half of it on average; 16-bit activations hold every
    position at the bound, which dense noise of 0.7x passes."""
    from compiled_llm.verify import _mismatch

    generator = torch.Generator().manual_seed(1)
    expected = torch.randn(6, 1000, generator=generator)

    def off_by(*shares):  # each position's relative RMS difference, as a share of the bound 0.1
        noise = torch.randn(6, 1000, generator=generator)
        noise *= expected.pow(2).mean(-1, keepdim=True).sqrt() / noise.pow(2).mean(-1, keepdim=True).sqrt()
        return expected + noise * 0.1 * torch.tensor(shares)[:, None]

    one_flip = off_by(0, 0.1, 1.8, 0.2, 0, 0.1)
    assert _mismatch(one_flip, expected, 1e-3, rms_bound=0.1, one_flip=True) is None
    assert "position 2: RMS difference" in _mismatch(one_flip, expected, 1e-3, rms_bound=0.1)
    assert "position 3" in _mismatch(off_by(0, 0.1, 1.8, 1.2, 0, 0.1), expected, 1e-3, rms_bound=0.1, one_flip=True)
    assert "position 2" in _mismatch(off_by(0, 0.1, 2.2, 0.2, 0, 0.1), expected, 1e-3, rms_bound=0.1, one_flip=True)
    dense = off_by(0.7, 0.6, 0.8, 0.7, 0.6, 0.7)
    assert _mismatch(dense, expected, 1e-3, rms_bound=0.1) is None
    assert "every position but the furthest" in _mismatch(dense, expected, 1e-3, rms_bound=0.1, one_flip=True)
