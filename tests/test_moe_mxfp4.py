"""`compiled_llm::moe_experts_mxfp4` (custom_ops/moe/mxfp4.py): the format against transformers' own MXFP4 reader,
the reference against float64, and the Triton grouped GEMMs (bytes dequantized in registers) against the reference, in
Triton's interpreter on CPU and on the GPU."""

from __future__ import annotations

import pytest
import torch

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from autotune.select import graph_value
from compiled_llm import CompileConfig, compile_model
from conftest import random_prompt, relative_error, run_in_interpreter, tiny_model
from custom_ops.moe.mxfp4 import dequantize_mxfp4, moe_experts_mxfp4_reference, random_mxfp4
from custom_ops.moe.triton_moe import reads_as_words
from custom_ops.triton_runtime import triton_available
from test_moe_experts import GEMV_TILE, TOLERANCE, float64_experts, random_routing, with_tile


def test_dequantize_is_transformers_reading_of_gpt_oss_checkpoints():
    """transformers' GPT-OSS loader takes blocks [E, N, K / 32, 16] and scales [E, N, K / 32] and returns W
    transposed ([E, K, N], as GptOssExperts stores it); ours, the same bytes as [E, N, K / 2], untransposed."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4(3, 8, 96, generator=torch.Generator().manual_seed(0), exponents=(100, 140))
    theirs = convert_moe_packed_tensors(blocks.view(3, 8, 3, 16), scales, dtype=torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), theirs.transpose(1, 2))
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16), theirs.transpose(1, 2).bfloat16())  # exact


def test_dequantize_by_hand():
    """Byte 0x2F: column 0 is code 15 (-6), column 1 code 2 (1.0); exponent 128 doubles them. Byte 0x91: 0.5, -0.5."""
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, :2] = torch.tensor([0x2F, 0x91], dtype=torch.uint8)
    scales = torch.tensor([[[128]]], dtype=torch.uint8)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    assert w.shape == (1, 1, 32)
    assert w[0, 0, :4].tolist() == [-12.0, 2.0, 1.0, -1.0] and not w[0, 0, 4:].any()


def mxfp4_case(tokens, hidden, inter, experts, top_k, seed, dtype, device, bias=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
    ids, weights = random_routing(tokens, experts, top_k, seed, dtype=torch.float32, device=device)
    w13 = (t.to(device) for t in random_mxfp4(experts, 2 * inter, hidden, generator=generator, exponents=(121, 124)))
    w2 = (t.to(device) for t in random_mxfp4(experts, hidden, inter, generator=generator, exponents=(121, 124)))
    b13 = (torch.randn(experts, 2 * inter, generator=generator) * 0.1).to(device, dtype) if bias else None
    b2 = (torch.randn(experts, hidden, generator=generator) * 0.1).to(device, dtype) if bias else None
    return x, ids, weights, (*w13, *w2), b13, b2


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_reference_against_float64(activation):
    params = [1.702, 7.0] if activation == "swiglu_oai" else []
    x, ids, weights, quantized, b13, b2 = mxfp4_case(5, 64, 32, 4, 2, 3, torch.float32, "cpu", bias=True)
    out = moe_experts_mxfp4_reference(x, ids, weights, *quantized, b13, b2, activation, params)
    w13, w2 = dequantize_mxfp4(*quantized[:2], torch.float64), dequantize_mxfp4(*quantized[2:], torch.float64)
    expected = float64_experts(x, ids, weights, w13, w2, b13, b2, tuple(params) or None)
    assert relative_error(out, expected) < 1e-5

# One token's GEMV over two exponent groups a step (and K = 32 under one masked step).
MXFP4_GEMV_TILE = GEMV_TILE | {"BLOCK_K": 64}


def check_mxfp4_triton_against_reference(device: str, dtype: torch.dtype) -> None:
    """One token (a block per pair), prefill rows in sorted blocks, N off the column tiles, GPT-OSS's interleaved
    gate/up rows with biases, and K over several column steps."""
    cases = [  # tokens, hidden, inter, experts, top_k, bias, activation
        (1, 64, 32, 8, 2, False, "silu"),
        (37, 96, 96, 6, 2, True, "silu"),  # N = 96, 192: off the 64-wide column tiles
        (9, 64, 32, 4, 2, True, "swiglu_oai"),
        (1, 256, 64, 4, 4, True, "swiglu_oai"),
    ]
    for seed, (tokens, hidden, inter, experts, top_k, bias, activation) in enumerate(cases):
        params = [1.702, 7.0] if activation == "swiglu_oai" else []
        x, ids, weights, quantized, b13, b2 = mxfp4_case(tokens, hidden, inter, experts, top_k, seed, dtype, device,
                                                         bias)  # fmt: skip
        expected = moe_experts_mxfp4_reference(x, ids, weights, *quantized, b13, b2, activation, params)
        actual = torch.ops.compiled_llm.moe_experts_mxfp4(x, ids, weights, *quantized, b13, b2, activation, params,
                                                          "triton")  # fmt: skip
        assert actual.dtype == dtype and actual.shape == x.shape
        error = relative_error(actual, expected)
        assert error < TOLERANCE[dtype], f"mxfp4 case {seed} {dtype}: relative error {error:.2e}"
    # Bytes one byte off a word's alignment (a view of a larger tensor): the one-token GEMV reads words, so these take
    # the tensor-core kernel, which reads bytes (on a GPU a misaligned word read would be a launch error).
    x, ids, weights, (w13, s13, w2, s2), b13, b2 = mxfp4_case(1, 64, 32, 4, 2, 9, dtype, device, bias=True)
    offset = torch.empty(w2.numel() + 1, dtype=torch.uint8, device=device)[1:].view(w2.shape)
    offset.copy_(w2)
    assert reads_as_words(w2, 0) and not reads_as_words(offset, 0)
    expected = moe_experts_mxfp4_reference(x, ids, weights, w13, s13, w2, s2, b13, b2, "swiglu_oai", [1.702, 7.0])
    actual = torch.ops.compiled_llm.moe_experts_mxfp4(x, ids, weights, w13, s13, offset, s2, b13, b2, "swiglu_oai",
                                                      [1.702, 7.0], "triton")  # fmt: skip
    assert relative_error(actual, expected) < TOLERANCE[dtype]


def check_exponents_far_from_one(device: str, dtype: torch.dtype) -> None:
    """Exponents from 0 (2^-127: subnormal weights) to 252 (2^125), through a down GEMM (no activation, x small: the
    sums stay finite): the one-token GEMV exact at every one; the tensor-core tile's own decode of several tokens
    exact up to 240, and past it (its factor 2^(s - 113) leaves float32) infinite or NaN, never finite and wrong.
    Both paths round their sums to the model's dtype as the reference does: float16 (largest 65504) is checked up to
    140 (2^13), where the sums still fit it."""
    from custom_ops.moe import triton_moe

    generator = torch.Generator().manual_seed(0)
    if dtype == torch.float16:
        cases = [(1, 140, triton_moe.MXFP4_ONE_TOKEN_TILE), (9, 140, {"BLOCK_K": 64})]
    else:
        cases = [(1, 252, triton_moe.MXFP4_ONE_TOKEN_TILE), (9, 240, {"BLOCK_K": 64}), (9, 252, {"BLOCK_K": 64})]
    for tokens, top, tile in cases:
        w, exponents = random_mxfp4(4, 32, 64, generator=generator, exponents=(0, top))
        x = torch.randn(tokens * 2, 64, generator=generator) / 1024
        ids = torch.randint(0, 4, (tokens, 2), generator=generator)
        route = torch.rand(tokens * 2, generator=generator)
        expected = torch.stack([dequantize_mxfp4(w[e], exponents[e], torch.float64) @ x[p].to(dtype).double() * r
                                for p, (e, r) in enumerate(zip(ids.flatten().tolist(), route.tolist()))])  # fmt: skip
        x, w, exponents, ids, route = (t.to(device) for t in (x.to(dtype), w, exponents, ids, route))
        out = triton_moe.grouped_gemm(x, w, None, x.new_empty(tokens * 2, 32, dtype=torch.float32), route,
                                      triton_moe.expert_blocks(ids, 4), gated=False, a_per_token=False,
                                      tile=triton_moe.DEFAULT_TILE | tile, mxfp4_scales=exponents)  # fmt: skip
        if top > 240 and tokens > 1:
            assert not torch.isfinite(out).all(), "an exponent past 240 must not give finite sums on this path"
        else:
            assert relative_error(out.cpu(), expected) < TOLERANCE[dtype], (tokens, top)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_exponents_far_from_one_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_moe_mxfp4 as t; "
        "t.check_exponents_far_from_one('cpu', torch.float32)"
    )


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_mxfp4_triton_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_moe_mxfp4 as t; "
        "t.check_mxfp4_triton_against_reference('cpu', torch.float32); "
        "t.check_mxfp4_triton_against_reference('cpu', torch.float16); "
        "from test_moe_experts import with_tile; "
        "with_tile(t.MXFP4_GEMV_TILE, t.check_mxfp4_triton_against_reference, 'cpu', torch.float32)"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mxfp4_triton_on_the_gpu(dtype):
    check_mxfp4_triton_against_reference("cuda", dtype)
    with_tile(MXFP4_GEMV_TILE, check_mxfp4_triton_against_reference, "cuda", dtype)
    for stages in (1, 2):  # the GEMV's K loop unpipelined and 2 deep (the tile above takes DEFAULT_TILE's 3)
        with_tile(MXFP4_GEMV_TILE | {"num_stages": stages}, check_mxfp4_triton_against_reference, "cuda", dtype)
    check_exponents_far_from_one("cuda", dtype)


@pytest.mark.gpu
def test_mxfp4_through_tl_dot_scaled_on_the_gpu(monkeypatch):
    """The tuning's other MXFP4 candidates: Triton's own microscaled dot upcasting the bytes, every row mode."""
    from custom_ops.moe import triton_moe

    heuristic = triton_moe.heuristic_tile
    tensor_core_tile = {"gemv": False, "dot_scaled": True}
    # the tensor-core tiles of each row mode (a float heuristic not the one-token GEMV's, which tl.dot cannot take)
    tiles = lambda mode, *args, **kwargs: heuristic(mode, k_contiguous=False) | tensor_core_tile  # noqa: E731
    monkeypatch.setattr(triton_moe, "heuristic_tile", tiles)
    check_mxfp4_triton_against_reference("cuda", torch.bfloat16)


def mxfp4_gpt_oss(seed: int = 0):
    """The tiny GPT-OSS with random MXFP4 experts, as an MXFP4 checkpoint loads (parameters: their dequantization)."""
    from compiled_llm.presets import random_mxfp4_experts

    model = tiny_model("gpt_oss")
    random_mxfp4_experts(model, torch.Generator().manual_seed(seed))
    return model


def test_an_mxfp4_checkpoint_runs_its_own_blocks_and_matches_hf(own_cache_dir):
    """quantization='auto' keeps the experts' MXFP4 tensors (exact: the kernel computes the parameters' own values):
    HF's logits on the same model, one moe_experts_mxfp4 a layer, no float expert weight left in the graph."""
    model = mxfp4_gpt_oss()
    compiled = compile_model(model, max_batch_size=2, max_seq_len=64, cache_dir=own_cache_dir)
    assert compiled.config.quantization == "mxfp4"
    assert compiled.report.pass_sites("keep_mxfp4_experts") == 2
    graph = compiled.graph_module.graph
    ops = [n for n in graph.nodes if n.target is torch.ops.compiled_llm.moe_experts_mxfp4.default]
    assert len(ops) == 2 and not [n for n in graph.nodes if n.target is torch.ops.compiled_llm.moe_experts.default]
    assert all(graph_value(compiled.graph_module, n.args[3]).dtype == torch.uint8 for n in ops)
    ids = random_prompt(20, batch=2, seed=4)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert relative_error(compiled(ids).logits, expected) < 1e-4


def test_a_stored_mxfp4_graph_takes_the_next_models_blocks(own_cache_dir):
    """The rewritten graph is stored without tensors: loaded for a model with other MXFP4 experts, it runs theirs."""
    fields = {"max_batch_size": 2, "max_seq_len": 64, "cache_dir": own_cache_dir}
    compile_model(mxfp4_gpt_oss(seed=0), **fields)
    other = mxfp4_gpt_oss(seed=1)
    compiled = compile_model(other, **fields)
    assert "rewritten graph from the graph cache" in str(compiled.report)
    ids = random_prompt(12, seed=5)
    with torch.no_grad():
        expected = other(ids, use_cache=False).logits
    assert relative_error(compiled(ids).logits, expected) < 1e-4


def test_mxfp4_refuses_float_experts_by_name():
    with pytest.raises(ValueError, match="quantization='mxfp4' keeps an MXFP4 checkpoint's experts, but .* not from one"):
        compile_model(tiny_model("gpt_oss"), quantization="mxfp4", compile_backend="eager")
    with pytest.raises(ValueError, match="quantize_lm_head=True does not apply to quantization='mxfp4'"):
        CompileConfig(quantization="mxfp4", quantize_lm_head=True)


def test_the_op_passes_opcheck():
    x, ids, weights, quantized, b13, b2 = mxfp4_case(3, 64, 32, 4, 2, 8, torch.float32, "cpu", bias=True)
    torch.library.opcheck(torch.ops.compiled_llm.moe_experts_mxfp4.default,
                          (x, ids, weights, *quantized, b13, b2, "swiglu_oai", [1.702, 7.0], "torch"))  # fmt: skip


def test_bytes_a_later_change_of_the_weights_left_behind_are_refused():
    """The model's experts loaded with other values after their MXFP4 bytes were attached (a state dict, a merged
    adapter): running the old bytes would be a silent wrong answer, so the compile refuses, naming the weight."""
    model, other = mxfp4_gpt_oss(seed=0), mxfp4_gpt_oss(seed=1)
    experts = {k: v for k, v in other.state_dict().items() if ".experts." in k}
    model.load_state_dict(experts, strict=False)  # in place: the parameters keep seed 0's bytes
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj .*no longer holds what its checkpoint's MXFP4 bytes"):
        compile_model(model, compile_backend="eager", max_batch_size=2, max_seq_len=32)


def test_exponents_past_what_the_kernel_decodes_are_refused():
    model = mxfp4_gpt_oss()
    weight = model.model.layers[0].mlp.experts.down_proj
    weight.mxfp4_scales[0, 0, 0] = 250  # 2^123: no trained weight, but a valid byte
    with torch.no_grad():
        weight.transpose(1, 2)[0].copy_(dequantize_mxfp4(weight.mxfp4_blocks[0], weight.mxfp4_scales[0], weight.dtype))
    with pytest.raises(ValueError, match="MXFP4 exponents reach 250; the kernel takes up to 240"):
        compile_model(model, compile_backend="eager", max_batch_size=2, max_seq_len=32)


def test_a_float16_model_is_refused_by_dtype():
    model = mxfp4_gpt_oss().half()  # float16 cannot hold every MXFP4 value: its parameters are not the bytes' values
    with pytest.raises(ValueError, match="decode exactly into bfloat16 or float32 only"):
        compile_model(model, compile_backend="eager", max_batch_size=2, max_seq_len=32)
