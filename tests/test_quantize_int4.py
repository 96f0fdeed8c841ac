"""quantization="int4_awq" (fx_passes/quantize_int4.py, fx_passes/awq_calibration.py): site counts, logits against the
module computing with the same 4-bit weights and within 4-bit rounding of the float module, the self-check, the AWQ
search against plain rounding, the calibration cache, and refusals."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model
from custom_ops.linear.int4 import dequantize, fake_quantize, quantize_weight
from fx_passes import calibration
from fx_passes.awq_calibration import search_clip, search_scales
from fx_passes.calibration import calibration_sequences
from fx_passes.quantize_int4 import group_size_for, int4_module

INT4_LINEAR = torch.ops.compiled_llm.int4_linear.default
# Widths that 128-column groups tile (the tiny models' 64 do not), and 96 for the down projection's input: groups of 32.
SHAPES = {"hidden_size": 128, "intermediate_size": 96, "head_dim": 32}


def compiled_int4(arch: str, cache_dir, **fields):
    model = tiny_model(arch, **SHAPES)
    compiled = compile_model(model, quantization="int4_awq", compile_backend="eager", max_batch_size=2, max_seq_len=64,
                             cache_dir=cache_dir, **fields)  # fmt: skip
    return model, compiled


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    """A tiny Llama compiled with int4_awq and the self-check on (eager: the rewritten graph, no Inductor)."""
    return compiled_int4("llama", tmp_path_factory.mktemp("awq_cache"), verify=True)


def int4_ops(compiled) -> list[torch.fx.Node]:
    return [n for n in compiled.graph_module.graph.nodes if n.target is INT4_LINEAR]


def test_qwen3_with_its_qk_norms(tmp_path):
    """Another family: the q/k norms between the fused projection and attention stay as they were."""
    model, compiled = compiled_int4("qwen3", tmp_path)
    assert compiled.report.pass_sites("quantize_int4") == 4 * model.config.num_hidden_layers
    ids = random_prompt(9)
    with torch.no_grad(), int4_module(model, compiled.graph_module.meta["int4_weights"]):
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_site_counts_and_group_sizes(llama_int4):
    model, compiled = llama_int4
    layers = model.config.num_hidden_layers
    assert compiled.report.pass_sites("quantize_int4") == 4 * layers  # fused q/k/v, o, fused gate/up, down
    ops = int4_ops(compiled)
    assert len(ops) == 4 * layers
    groups = sorted({n.args[7] for n in ops})
    assert groups == [32, 128]  # 128 columns, and the down projection's 96 in groups of 32
    assert not any(
        n.target is torch.ops.aten.linear.default for n in compiled.graph_module.graph.nodes
    )  # LM head: routed
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert "the LM head (quantize_lm_head=False)" in result.detail and "AWQ scales" in result.detail


def test_logits_match_the_module_computing_with_the_same_4_bit_weights(llama_int4):
    """The compiled graph against the module itself whose linears run the reference op over the pass's tensors (each
    part's rows of the fused ones): exact up to float32 summation, prefill and decode."""
    model, compiled = llama_int4
    ids = random_prompt(12)
    meta = compiled.graph_module.meta
    with torch.no_grad(), int4_module(model, meta["int4_weights"]):
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        float_logits = model(ids, use_cache=False).logits
    relative = (expected - float_logits).norm() / float_logits.norm()
    # ~10% RMS a linear (a step of range / 15), 8 of them over random weights: ~30%. The real-weights bound is
    # test_int4_accuracy.py's perplexity.
    assert 0 < relative < 0.5


def test_the_model_itself_is_left_as_it_was(llama_int4):
    model, _ = llama_int4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())


def test_awq_scales_beat_plain_rounding_where_a_few_channels_carry_large_activations():
    """AWQ's premise: inputs with outlier channels. Its search keeps the scaling that measured best, so its error is
    at most plain rounding's, and here well under it."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator)
    x = torch.randn(512, 256, generator=generator)
    x[:, :8] *= 30
    smooth, clip, ratio = search_scales(x, weight, 128)
    assert smooth is not None and smooth.shape == (256,) and ratio < 0.7
    assert smooth[:8].max() < smooth[8:].min()  # the outlier columns' weights were scaled up: smaller smooth
    assert clip is None or clip.shape == (64, 2)
    _, _, ratio = search_scales(torch.randn(512, 256, generator=generator), weight, 128)
    assert ratio <= 1.0


def test_clipping_a_group_with_one_outlier_weight_measures_better():
    """A group whose range one weight stretches: clipping it gives the other 127 finer steps, which the search finds
    against the group's share of x W^T (every ratio's error, computed from the inputs' second moments, is the mean
    over rows of the squared product)."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 128, generator=generator) * 0.1
    weight[:, 5] = 3.0
    x = torch.randn(256, 128, generator=generator)
    clip = search_clip(x, weight, 128, None)
    assert clip is not None and (clip < 3.0).any()
    errors = [((x @ (fake_quantize(weight, 128, None, c) - weight).t()) ** 2).mean()
              for c in (None, clip)]  # fmt: skip
    assert errors[1] < errors[0]


def test_calibration_text_goes_through_the_tokenizer_in_sequences():
    words = lambda text: {"input_ids": list(range(len(text.split())))}
    sequences, source = calibration_sequences(words, 1000)
    assert "calibration.txt" in source
    assert [len(s) for s in sequences[:-1]] == [calibration.SEQUENCE_TOKENS] * (len(sequences) - 1)
    assert sum(map(len, sequences)) == min(calibration.CALIBRATION_TOKENS, 711)


def test_a_model_without_a_linear_it_can_quantize_is_refused(tmp_path):
    model = tiny_model("llama", hidden_size=40, intermediate_size=80, head_dim=10)  # widths of no group size
    with pytest.raises(ValueError, match="int4_awq' found no linear it can quantize"):
        compile_model(model, quantization="int4_awq", compile_backend="eager", max_seq_len=32, cache_dir=tmp_path)


def test_group_sizes_are_the_largest_that_divide_the_width():
    assert [group_size_for(k) for k in (4096, 576, 96, 40)] == [128, 64, 32, None]


def test_the_self_check_catches_a_rewrite_that_drops_the_awq_scales(tmp_path, monkeypatch):
    """The self-check holds int4 graphs to the module over the same 4-bit weights as tightly as float ones: a pass that
    forgets to multiply x by the smooth (a few percent on the logits, less than 4-bit rounding itself) fails it."""
    from compiled_llm.verify import SelfCheckError
    from fx_passes import registry
    from fx_passes.quantize_int4 import INT4_LINEAR, quantize_int4

    def without_smooth(gm, config):
        result = quantize_int4(gm, config)
        for node in gm.graph.nodes:
            if node.target is INT4_LINEAR:
                node.args = (*node.args[:4], None, [], *node.args[6:])
        return result

    monkeypatch.setitem(registry._PASSES, "quantize_int4", without_smooth)
    with pytest.raises(SelfCheckError, match="differs from the module itself"):
        compiled_int4("llama", tmp_path, verify=True, graph_cache=False)


@pytest.mark.gpu
def test_int4_awq_on_the_gpu_matches_the_module_over_the_same_weights(own_cache_dir):
    """bf16 on CUDA, Inductor and CUDA graphs, the triton kernels (GEMV for decode, tensor-core GEMM for the prompt):
    the self-check passes, and each greedy token is the best of the module computing with the same 4-bit weights, fed
    the same tokens, or within bfloat16 rounding of it (the kernels round x * smooth to bfloat16 for the tensor cores,
    which can swap two near-tied tokens: a sequence compared whole would part there)."""
    model = tiny_model("llama", **SHAPES).to("cuda", torch.bfloat16)
    compiled = compile_model(model, quantization="int4_awq", max_batch_size=2, max_seq_len=64, verify=True,
                             cache_dir=own_cache_dir)  # fmt: skip
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert "triton:" in result.detail
    ids = random_prompt(10).cuda()
    tokens = compiled.generate(ids, max_new_tokens=16, do_sample=False)
    with torch.no_grad(), int4_module(model, compiled.graph_module.meta["int4_weights"]):
        logits = model(tokens[:, :-1], use_cache=False).logits[0, ids.shape[1] - 1 :].float()
    chosen = logits.gather(1, tokens[0, ids.shape[1] :, None])[:, 0]
    assert (logits.amax(dim=1) - chosen <= 0.02 * logits.abs().amax()).all()
    assert (logits.argmax(dim=1) == tokens[0, ids.shape[1] :]).float().mean() >= 0.75


def test_a_calibrated_graph_is_not_stored_for_a_warm_start(tmp_path, caplog):
    """A rewritten graph replays its recipes over another checkpoint's weights; AWQ's scalings are this one's, so the
    graph is not stored (the calibration is, keyed by the weights), and a second compile runs the passes again."""
    with caplog.at_level(logging.INFO, logger="compiled_llm"):
        compiled_int4("llama", tmp_path)
    assert "rewritten graph not stored: AWQ's calibration is of this checkpoint's weights" in caplog.text


def test_an_unwritable_cache_costs_a_warning_not_the_compile(tmp_path, caplog, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(calibration.torch, "save", refuse)
    with caplog.at_level(logging.WARNING, logger="compiled_llm"):
        _, compiled = compiled_int4("llama", tmp_path)
    assert compiled.report.pass_sites("quantize_int4") == 8
    assert "not written (read-only file system)" in caplog.text
    assert not list((tmp_path / "awq").glob("*"))  # no temporary file left


def attach_stored(module: torch.nn.Linear, fmt: str) -> None:
    """A checkpoint's 4-bit tensors on a linear's weight, as int4_checkpoint.py / gguf_blocks.py attach them."""
    with torch.no_grad():
        stored = quantize_weight(module.weight, 32)
        module.weight.copy_(dequantize(*stored, 32))
    module.weight.int4_tensors = (*stored, 32, fmt)


def test_stored_tensors_run_only_under_their_own_format_and_fuse_only_whole(tmp_path):
    """A GGUF model's blocks run under quantization='gguf'; a fused q/k/v whose parts are not all stored keeps the
    model's dtype (reported); int4_awq asked of the same model calibrates its weights instead of running the blocks."""
    model = tiny_model("llama", **SHAPES)
    for layer in model.model.layers:
        attach_stored(layer.mlp.down_proj, "gguf")
        attach_stored(layer.self_attn.q_proj, "gguf")  # k and v stay float: q/k/v fused has no stored tensors
    fields = {"compile_backend": "eager", "max_batch_size": 2, "max_seq_len": 64, "cache_dir": tmp_path}
    compiled = compile_model(model, quantization="gguf", verify=True, **fields)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    layers = model.config.num_hidden_layers
    assert result.sites == layers and "as stored" in result.detail  # the down projections
    assert f"{3 * layers} linears the checkpoint stores in float" in result.detail  # fused q/k/v, o, fused gate/up
    compiled = compile_model(model, quantization="int4_awq", **fields)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert result.sites == 4 * layers and "AWQ scales" in result.detail
