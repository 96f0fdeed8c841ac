"""fuse_norm_quantize_int8 and fuse_silu_mul_quantize_int8: the residual add + RMSNorm, and the SiLU gate, writing
the int8 activations (SmoothQuant's smooth applied) of the linear they feed. Pure fusions: the logits equal the
unfused graph's exactly, and compiled_llm::add_rms_norm_int8 and silu_mul_int8 equal their unfused ops then
int8_linear's per-token quantization bit for bit (in the interpreter and on the GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, run_in_interpreter, tiny_model

import custom_ops  # noqa: F401  (registers the ops)
from compiled_llm import compile_model
from custom_ops.linear.int8 import quantize_rows
from fx_passes import DEFAULT_PIPELINE

FUSIONS = ("fuse_norm_quantize_int8", "fuse_silu_mul_quantize_int8")


def test_the_norms_and_gates_feeding_int8_linears_write_int8_and_the_logits_do_not_move(tmp_path):
    """2 layers: layer 0's post-attention norm and layer 1's two norms (layer 0's input norm has no residual add, the
    final norm feeds the LM head, kept in the model's dtype), each feeding one fused linear (q/k/v or gate/up); each
    layer's SiLU gate before its down projection. Each pass alone, and both, against neither."""
    fields = {"compile_backend": "eager", "quantization": "int8_sq", "norm_backend": "triton", "cache_dir": tmp_path}
    unfused = compile_model(
        tiny_model("llama"), passes=tuple(p for p in DEFAULT_PIPELINE if p not in FUSIONS), **fields
    )
    ids = torch.randint(3, VOCAB, (1, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = unfused(ids).logits
    for left_out, sites in (
        ("fuse_silu_mul_quantize_int8", (3, 0)),
        ("fuse_norm_quantize_int8", (0, 2)),
        (None, (3, 2)),
    ):
        fused = compile_model(tiny_model("llama"), passes=tuple(p for p in DEFAULT_PIPELINE if p != left_out), **fields)
        assert tuple(fused.report.pass_sites(name) for name in FUSIONS) == sites
        targets = [n.target for n in fused.graph_module.graph.nodes]
        assert targets.count(torch.ops.compiled_llm.int8_linear_quantized.default) == sum(sites)
        assert targets.count(torch.ops.compiled_llm.int8_linear.default) == 8 - sum(sites)
        assert targets.count(torch.ops.compiled_llm.silu_mul_int8.default) == sites[1]
        with torch.no_grad():
            assert torch.equal(fused(ids).logits, expected)


def check_gate_against_reference(device: str, dtype: torch.dtype) -> None:
    """Against the unfused gate's own kernel (its sigmoid is the fused kernel's; torch's, as silu_and_mul rounds it,
    can move a rounded value by a step), then the reference quantization."""
    from custom_ops.linear.triton_silu_mul import triton_silu_mul

    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, width in ((1, 4096), (37, 576)):
        gate_up = torch.randn(rows, 2 * width, generator=generator).to(device, dtype)
        for smooth in (None, (torch.rand(width, generator=generator) + 0.5).to(device)):
            x8, scale = torch.ops.compiled_llm.silu_mul_int8(gate_up, smooth, "triton")
            expected8, expected_scale = quantize_rows(triton_silu_mul(gate_up), smooth)
            assert torch.equal(scale, expected_scale) and torch.equal(x8, expected8)


def check_kernel_against_reference(device: str, dtype: torch.dtype) -> None:
    """Against the unfused norm's own kernel (the `triton` add_rms_norm: its float32 sum of squares is the fused
    kernel's, where torch's sums in another order and can move a rounded value by a step, tests/test_rms_norm.py holds
    the two together), then the reference quantization."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, width in ((1, 4096), (37, 576), (300, 1000)):
        x, residual = (torch.randn(rows, width, generator=generator).to(device, dtype) for _ in range(2))
        weight = (torch.rand(width, generator=generator) + 0.5).to(device, dtype)
        for smooth in (None, (torch.rand(width, generator=generator) + 0.5).to(device)):
            x8, scale, total = torch.ops.compiled_llm.add_rms_norm_int8(x, residual, weight, smooth, 1e-5, "triton")
            normed, expected_total = torch.ops.compiled_llm.add_rms_norm(x, residual, weight, 1e-5, "triton")
            expected8, expected_scale = quantize_rows(normed, smooth)
            assert torch.equal(total, expected_total) and torch.equal(scale, expected_scale)
            assert torch.equal(x8, expected8)


def test_the_kernels_equal_the_unfused_ops_then_the_quantization_in_the_interpreter():
    """float16 (the interpreter's bfloat16 rounds otherwise than torch's)."""
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_fuse_quantize_int8 as t; "
        "t.check_kernel_against_reference('cpu', torch.float16); t.check_gate_against_reference('cpu', torch.float16)"
    )


@pytest.mark.gpu
def test_the_kernels_equal_the_unfused_ops_then_the_quantization_on_the_gpu():
    check_kernel_against_reference("cuda", torch.bfloat16)
    check_gate_against_reference("cuda", torch.bfloat16)
