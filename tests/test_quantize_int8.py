"""quantization="int8_sq" (fx_passes/quantize_int8.py): SmoothQuant's scales, site counts, logits against the module
computing with the same int8 tensors and near the float module's, the self-check, the calibration cache."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model
from compiled_llm.verify import SelfCheckError
from fx_passes.quantize_int8 import int8_module, smoothquant_smooth
from tests.misscaled import pipeline_misscaling

INT8_LINEAR = torch.ops.compiled_llm.int8_linear.default


def test_smoothquant_moves_the_activations_outliers_into_the_weight():
    """s_k = max|x_k|^a / max|W_k|^(1 - a): a = 1 puts all of x's range on W (x * smooth has every channel's max 1),
    a = 0 all of W's; 0.5 meets halfway, the products' range per channel unchanged."""
    x_absmax = torch.tensor([100.0, 1.0, 4.0])
    weight = torch.tensor([[1.0, 0.5, 0.25], [-0.5, 0.25, 1.0]])  # columns' max 1, 0.5, 1
    assert torch.allclose(smoothquant_smooth(x_absmax, weight, 1.0), 1 / x_absmax)
    assert torch.allclose(smoothquant_smooth(x_absmax, weight, 0.0), torch.tensor([1.0, 0.5, 1.0]))
    smooth = smoothquant_smooth(x_absmax, weight, 0.5)
    assert torch.allclose(smooth, torch.tensor([0.1, 2**-0.5, 0.5]))
    assert torch.allclose(x_absmax * smooth * (weight.abs().amax(0) / smooth), x_absmax * weight.abs().amax(0))


def compiled_int8(arch: str, cache_dir, **fields):
    model = tiny_model(arch)
    compiled = compile_model(model, quantization="int8_sq", compile_backend="eager", max_batch_size=2, max_seq_len=64,
                             cache_dir=cache_dir, **fields)  # fmt: skip
    return model, compiled


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_every_decoder_linear_is_int8_and_matches_the_module_over_the_same_tensors(arch, tmp_path):
    model, compiled = compiled_int8(arch, tmp_path, verify=True)  # the self-check holds it too
    layers = model.config.num_hidden_layers
    assert compiled.report.pass_sites("quantize_int8") == 4 * layers  # fused q/k/v, o, fused gate/up, down
    ops = [n for n in compiled.graph_module.graph.nodes if n.target is INT8_LINEAR]
    gates = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.compiled_llm.silu_mul_int8.default]
    assert len(gates) == layers  # fuse_silu_mul_quantize_int8: the down projections read the gates' int8 rows
    assert len(ops) == 3 * layers and all(n.args[3] is not None for n in ops)  # each with its smooth
    assert all(n.args[1] is not None for n in gates)
    ids = random_prompt(12)
    with torch.no_grad(), int8_module(model, compiled.graph_module.meta["int8_weights"]):
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        float_logits = model(ids, use_cache=False).logits
    assert 0 < ((expected - float_logits).norm() / float_logits.norm()).item() < 0.1  # 8 bits: a few percent


def test_the_self_check_fails_a_wrongly_scaled_int8_weight(tmp_path):
    """The self-check's reference quantizes the module's own weights, so a scale the pass wrote wrongly is not its
    reference's too."""
    passes = pipeline_misscaling(INT8_LINEAR, 2, after="quantize_int8")  # one int8 weight's scales
    with pytest.raises(SelfCheckError, match="differs from the module itself"):
        compiled_int8("llama", tmp_path, verify=True, passes=passes)


def test_alpha_changes_the_scales(tmp_path):
    _, half = compiled_int8("llama", tmp_path)
    _, more = compiled_int8("llama", tmp_path, smoothquant_alpha=0.8)
    smooths = [[t for w, (_, _, t) in c.graph_module.meta["int8_weights"]] for c in (half, more)]
    assert not torch.equal(smooths[0][0], smooths[1][0])
    assert len(list((tmp_path / "smoothquant").glob("*.pt"))) == 2  # one entry each


@pytest.mark.gpu
def test_int8_sq_on_the_gpu_passes_the_self_check(own_cache_dir):
    """bf16 on CUDA, Inductor and CUDA graphs, the Triton backend (its quantizing kernel and decode GEMM, the norms
    writing int8 rows, torch._int_mm for the prompt): the self-check passes and the logits stay within 8-bit rounding
    of the float module's."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    compiled = compile_model(model, quantization="int8_sq", max_batch_size=2, max_seq_len=64, verify=True,
                             cache_dir=own_cache_dir)  # fmt: skip
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int8"]
    assert "triton:" in result.detail and compiled.report.pass_sites("fuse_norm_quantize_int8") == 3
    ids = random_prompt(10).cuda()
    with torch.no_grad():
        float_logits = model(ids, use_cache=False).logits.float()
    relative = (compiled(ids).logits.float() - float_logits).norm() / float_logits.norm()
    assert relative < 0.1
