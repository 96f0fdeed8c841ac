"""fuse_norm_quantize_int8: residual add + RMSNorm writing the int8 activations (SmoothQuant's smooth applied) of
the linear it feeds. A pure fusion: the logits equal the unfused graph's exactly, and compiled_llm::add_rms_norm_int8
equals add_rms_norm then int8_linear's per-token quantization bit for bit (in the interpreter and on the GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, run_in_interpreter, tiny_model

import custom_ops  # noqa: F401  (registers the ops)
from compiled_llm import compile_model
from custom_ops.linear.int8 import quantize_rows
from fx_passes import DEFAULT_PIPELINE

UNFUSED = tuple(p for p in DEFAULT_PIPELINE if p != "fuse_norm_quantize_int8")


def test_the_norms_feeding_int8_linears_write_int8_and_the_logits_do_not_move(tmp_path):
    """2 layers: layer 0's post-attention norm and layer 1's two norms (layer 0's input norm has no residual add, the
    final norm feeds the LM head, kept in the model's dtype); each feeds one fused linear (q/k/v or gate/up)."""
    fields = {"compile_backend": "eager", "quantization": "int8_sq", "norm_backend": "triton", "cache_dir": tmp_path}
    fused = compile_model(tiny_model("llama"), **fields)
    unfused = compile_model(tiny_model("llama"), passes=UNFUSED, **fields)
    assert fused.report.pass_sites("fuse_norm_quantize_int8") == 3
    targets = [n.target for n in fused.graph_module.graph.nodes]
    assert targets.count(torch.ops.compiled_llm.int8_linear_quantized.default) == 3
    assert targets.count(torch.ops.compiled_llm.int8_linear.default) == 8 - 3
    ids = torch.randint(3, VOCAB, (1, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, unfused(ids).logits)


def check_kernel_against_reference(device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, width in ((1, 4096), (37, 576), (300, 1000)):
        x, residual = (torch.randn(rows, width, generator=generator).to(device, dtype) for _ in range(2))
        weight = (torch.rand(width, generator=generator) + 0.5).to(device, dtype)
        for smooth in (None, (torch.rand(width, generator=generator) + 0.5).to(device)):
            x8, scale, total = torch.ops.compiled_llm.add_rms_norm_int8(x, residual, weight, smooth, 1e-5, "triton")
            normed, expected_total = torch.ops.compiled_llm.add_rms_norm(x, residual, weight, 1e-5, "torch")
            expected8, expected_scale = quantize_rows(normed, smooth)
            assert torch.equal(total, expected_total) and torch.equal(scale, expected_scale)
            assert torch.equal(x8, expected8)


def test_the_kernel_equals_the_norm_then_the_quantization_in_the_interpreter():
    """float16 (the interpreter's bfloat16 rounds otherwise than torch's)."""
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_fuse_norm_quantize_int8 as t; "
        "t.check_kernel_against_reference('cpu', torch.float16)"
    )


@pytest.mark.gpu
def test_the_kernel_equals_the_norm_then_the_quantization_on_the_gpu():
    check_kernel_against_reference("cuda", torch.bfloat16)
