"""quantization="nvfp4" (fx_passes/quantize_nvfp4.py): site counts, AWQ's search over NVFP4's rounding, logits against
the module whose weights are the dequantized NVFP4 tensors (times AWQ's smooth) and within 4-bit rounding of the float
module, the self-check, a checkpoint's tensors taken as stored (fused with each part's global scale), and refusals.
(The rounding itself is held to ModelOpt's, bit for bit, in test_nvfp4_linear.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model
from compiled_llm.verify import SelfCheckError
from custom_ops.linear.nvfp4 import dequantize, quantize_weight
from fx_passes import quantized_reference
from fx_passes.quantize_nvfp4 import nvfp4_module, rerounded
from fx_passes.quantized_reference import linear_parts, part_smooth
from tests.misscaled import pipeline_misscaling

NVFP4_LINEAR = torch.ops.compiled_llm.nvfp4_linear.default
FIELDS = {"compile_backend": "eager", "max_batch_size": 2, "max_seq_len": 64}


@pytest.fixture(scope="module")
def llama_nvfp4(tmp_path_factory):
    """A tiny Llama compiled with nvfp4 and the self-check on (eager: the rewritten graph, no Inductor), its records
    keeping the search's clips past the self-check (for the tests that round the weights again)."""
    model = tiny_model("llama")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized_reference, "KEEP_ROUNDINGS", True)
        return model, compile_model(model, quantization="nvfp4", verify=True, cache_dir=tmp_path_factory.mktemp("c"),
                                    **FIELDS)  # fmt: skip


def dequantized_model(model: torch.nn.Module, records: list) -> torch.nn.Module:
    """A copy of `model` whose quantized linears hold the dequantized NVFP4 weights times their part's smooth (each its
    rows of a fused one): an ordinary module, no op of this project's in its forward."""
    copied = copy.deepcopy(model)
    by_storage = {w.untyped_storage().data_ptr(): (w, tensors) for w, tensors in records}
    for (name, module), original in zip(copied.named_modules(), model.modules()):
        if not isinstance(module, torch.nn.Linear) or original.weight.untyped_storage().data_ptr() not in by_storage:
            continue
        whole, (weight, scales, global_scale, smooth, smooth_rows, _) = by_storage[
            original.weight.untyped_storage().data_ptr()
        ]
        first = (original.weight.storage_offset() - whole.storage_offset()) // whole.stride(0)
        rounded = dequantize(weight, scales, global_scale)
        if smooth is not None:  # x * smooth @ W^T = x @ (W * smooth)^T, each part its row
            rounded = rounded * smooth.repeat_interleave(torch.tensor(smooth_rows, device=smooth.device), 0)
        with torch.no_grad():
            module.weight.copy_(rounded[first : first + module.weight.shape[0]])
    return copied


def test_site_counts_and_the_awq_search(llama_nvfp4):
    model, compiled = llama_nvfp4
    layers = model.config.num_hidden_layers
    assert compiled.report.pass_sites("quantize_nvfp4") == 4 * layers  # fused q/k/v, o, fused gate/up, down
    ops = [n for n in compiled.graph_module.graph.nodes if n.target is NVFP4_LINEAR]
    assert len(ops) == 4 * layers
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_nvfp4"]
    assert "the LM head (quantize_lm_head=False)" in result.detail and "AWQ scales" in result.detail
    assert any(n.args[4] is not None for n in ops)  # AWQ scaled some (random ids: a search all the same)
    for n in ops:  # a fused weight's smooth has a row per part
        if n.args[4] is not None:
            assert len(n.args[5]) == getattr(compiled.graph_module, n.args[4].target).shape[0]


def test_logits_match_the_module_with_the_dequantized_weights(llama_nvfp4):
    """Prefill and decode against the HF module whose weights are the NVFP4 tensors dequantized: float32 summation
    apart; and 4-bit rounding away from the float module."""
    model, compiled = llama_nvfp4
    ids = random_prompt(12)
    rounded = dequantized_model(model, compiled.graph_module.meta["nvfp4_weights"])
    with torch.no_grad():
        expected = rounded(ids, use_cache=False).logits
        float_logits = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, do_sample=False),
                       rounded.generate(ids, max_new_tokens=8, do_sample=False))  # fmt: skip
    relative = ((expected - float_logits).norm() / float_logits.norm()).item()
    assert 0 < relative < 0.5  # E2M1: ~8% RMS a linear, 8 of them over random weights


def test_the_reference_rounds_the_module_s_own_weights_to_the_graph_s_tensors_bit_for_bit(llama_nvfp4):
    """The self-check's reference rounds each module's weight again (its rows of a fused q/k/v or gate/up, with its
    part's smooth, rows of the search's clips, kept on the host, and the whole fused weight's global scale): the
    graph's codes and scales exactly, which the self-check of the fixture's compile (verify=True) held the graph to.
    A part rounded with its own global scale (its rows' max) would not be: the global scale is the fused weight's."""
    model, compiled = llama_nvfp4
    assert compiled.report.self_check_share is not None and compiled.report.self_check_share < 1
    records = compiled.graph_module.meta["nvfp4_weights"]
    assert all(t[5] is not None and t[5].kept for _, t in records)
    assert any(t[5].clip is not None and t[5].clip.device.type == "cpu" for _, t in records)  # the search clipped some
    parts = linear_parts(model, records, "nvfp4")
    assert len(parts) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    own_scale_differs = False
    for module, whole, tensors, first, count in parts:
        again = rerounded(module.weight, whole, tensors, first, count)
        for graph, mine in zip(tensors[:3], again):
            assert mine.dtype == graph.dtype and torch.equal(mine, graph[first : first + count])
        if count < whole.shape[0]:
            clip = tensors[5].clip
            alone = quantize_weight(module.weight, part_smooth(tensors[3], tensors[4], first, count)[0],
                                    None if clip is None else clip[first : first + count])  # fmt: skip
            own_scale_differs |= not torch.equal(alone[2], again[2])
    assert own_scale_differs


def test_the_self_check_fails_a_wrongly_scaled_nvfp4_weight(llama_nvfp4):
    """The self-check's reference rounds the module's own weights, so a scale the pass wrote wrongly is not its
    reference's too (the search's results from the fixture's calibration cache)."""
    _, compiled = llama_nvfp4
    # its global scale (float32), by which every block's e4m3 scale is multiplied
    passes = pipeline_misscaling(NVFP4_LINEAR, 3, after="quantize_nvfp4")
    with pytest.raises(SelfCheckError, match="differs from the module itself"):
        compile_model(tiny_model("llama"), quantization="nvfp4", verify=True, cache_dir=compiled.config.cache_dir,
                      graph_cache=False, passes=passes, **FIELDS)  # fmt: skip


def test_the_clips_are_released_after_the_self_check(llama_nvfp4):
    """Nothing reads the search's clips after the self-check (host memory: NVFP4's are 1/4 byte a weight)."""
    compiled = compile_model(tiny_model("llama"), quantization="nvfp4", verify=True,
                             cache_dir=llama_nvfp4[1].config.cache_dir, **FIELDS)  # fmt: skip
    assert compiled.report.self_check_share is not None
    assert all(t[5].clip is None and not t[5].kept for _, t in compiled.graph_module.meta["nvfp4_weights"])


def test_without_the_self_check_the_records_keep_no_clips(llama_nvfp4):
    """verify=False: the search's clips are not kept past the rewrite (host memory), and a reference asked of the
    records says why it cannot round the weights again."""
    model = tiny_model("llama")
    compiled = compile_model(model, quantization="nvfp4", verify=False, cache_dir=llama_nvfp4[1].config.cache_dir,
                             **FIELDS)  # fmt: skip
    records = compiled.graph_module.meta["nvfp4_weights"]
    assert all(t[5].clip is None for _, t in records) and not all(t[5].kept for _, t in records)
    with pytest.raises(ValueError, match="verify=False"), torch.no_grad(), nvfp4_module(model, records):
        model(random_prompt(4), use_cache=False)


def test_stored_tensors_are_taken_as_they_are_and_fuse_with_their_own_global_scales(tmp_path):
    """A checkpoint's tensors (as nvfp4_checkpoint.py attaches them) with a different global scale per projection:
    the fused q/k/v keeps each part's, and the graph computes the module's dequantized weights."""
    model = tiny_model("llama")
    for index, module in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        if module is model.lm_head:
            continue
        with torch.no_grad():
            module.weight.mul_(1 + index % 3)  # parts of one fused weight of different ranges
            stored = quantize_weight(module.weight)
            module.weight.copy_(dequantize(*stored))
        module.weight.nvfp4_tensors = stored
    compiled = compile_model(model, quantization="nvfp4", verify=True, cache_dir=tmp_path, **FIELDS)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_nvfp4"]
    assert result.sites == 4 * model.config.num_hidden_layers and "as stored" in result.detail
    fused = [t for w, t in compiled.graph_module.meta["nvfp4_weights"] if w.shape[0] == 64 + 2 * 32]  # q/k/v
    assert fused and len(set(fused[0][2].tolist())) == 3  # q, k and v each their own global scale
    assert all(t[5] is None for _, t in compiled.graph_module.meta["nvfp4_weights"])  # read as stored, not rounded
    # the parts' stored codes now view the fused ones: stored once
    q_codes = model.model.layers[0].self_attn.q_proj.weight.nvfp4_tensors[0]
    fused_codes = [t[0] for w, t in compiled.graph_module.meta["nvfp4_weights"] if w.shape[0] == 64 + 2 * 32]
    assert any(q_codes.untyped_storage().data_ptr() == c.untyped_storage().data_ptr() for c in fused_codes)
    ids = random_prompt(10)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits  # the module's weights are the dequantized tensors
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_model_without_a_linear_it_can_quantize_is_refused(tmp_path):
    model = tiny_model("llama", hidden_size=72, head_dim=18, intermediate_size=40)  # 72, 40: not multiples of 16
    with pytest.raises(ValueError, match="quantization='nvfp4' found no linear it can quantize"):
        compile_model(model, quantization="nvfp4", cache_dir=tmp_path, **FIELDS)


@pytest.mark.gpu
def test_nvfp4_on_the_gpu_matches_the_module_with_the_dequantized_weights(own_cache_dir):
    """bf16 on CUDA, Inductor and CUDA graphs, the triton kernels (GEMV for decode, tensor-core GEMM for the prompt):
    the self-check passes, and greedy tokens are the dequantized module's."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32).to("cuda", torch.bfloat16)
    compiled = compile_model(model, quantization="nvfp4", max_batch_size=2, max_seq_len=64, verify=True,
                             cache_dir=own_cache_dir)  # fmt: skip
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_nvfp4"]
    assert "triton:" in result.detail
    rounded = dequantized_model(model, compiled.graph_module.meta["nvfp4_weights"])
    ids = random_prompt(10).cuda()
    expected = rounded.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=16, do_sample=False), expected)


def test_auto_resolving_to_a_one_rank_format_over_ranks_is_refused():
    """quantization='auto' over an NVFP4 checkpoint is nvfp4, which runs on one rank: over two it is an error before
    any rank starts, never the shards' float values rounded again."""
    model = tiny_model("llama")
    model.compiled_llm_quantization = "nvfp4"  # as nvfp4_checkpoint.py marks a loaded checkpoint
    with pytest.raises(ValueError, match="quantization='nvfp4' runs on one rank only"):
        compile_model(model, tensor_parallel_size=2, **FIELDS)
