"""fuse_norm_quantize_fp8: residual add + RMSNorm writing the FP8 activations of the linears it feeds. A pure
fusion: the logits equal the unfused graph's exactly, and compiled_llm::add_rms_norm_fp8 equals add_rms_norm then
the per-token quantization (the GPU kernel bit for bit against the unfused kernel, to rounding against torch's norm)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

import custom_ops  # noqa: F401  (registers the ops)
from compiled_llm import compile_model
from custom_ops.linear.fp8 import quantize_rows
from fx_passes import DEFAULT_PIPELINE, with_fp8_fusions


NO_FUSION = DEFAULT_PIPELINE
ONLY_NORM_FUSION = with_fp8_fusions(DEFAULT_PIPELINE, ("fuse_norm_quantize_fp8",))


def sites(compiled, name: str) -> int:
    (result,) = [p for p in compiled.report.passes if p.name == name]
    return result.sites


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_the_norms_feeding_fp8_linears_write_fp8_and_the_logits_do_not_move(arch):
    """2 layers: layer 0's post-attention norm and layer 1's two norms (layer 0's input norm has no residual add,
    the final norm feeds the bf16 LM head); in the MoE model the post-attention norm feeds the router, kept in
    the model's dtype, so only the input norm of layer 1 fuses."""
    fields = {"compile_backend": "eager", "quantization": "fp8", "norm_backend": "triton"}
    fused = compile_model(tiny_model(arch), passes=ONLY_NORM_FUSION, **fields)
    unfused = compile_model(tiny_model(arch), passes=NO_FUSION, **fields)
    assert sites(fused, "fuse_norm_quantize_fp8") == (1 if arch == "qwen3_moe" else 3)
    graph = fused.graph_module.graph
    assert sum(n.target is torch.ops.compiled_llm.fp8_linear_quantized.default for n in graph.nodes) == (
        1 if arch == "qwen3_moe" else 3
    )
    ids = torch.randint(3, VOCAB, (1, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, unfused(ids).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("late_trigger", [False, True])  # where it lets the next kernel launch (PDL), not what it computes
def test_the_kernel_equals_the_norm_then_the_quantization_bit_for_bit(monkeypatch, late_trigger):
    from custom_ops import triton_runtime

    monkeypatch.setattr(triton_runtime, "FUSED_PRODUCERS_TRIGGER_LATE", late_trigger)
    seed = torch.seed() % 2**31
    generator = torch.Generator().manual_seed(seed)
    for rows, width in ((1, 4096), (37, 576), (300, 1000)):
        x, residual = (torch.randn(rows, width, generator=generator).to("cuda", torch.bfloat16) for _ in range(2))
        weight = (torch.rand(width, generator=generator) + 0.5).to("cuda", torch.bfloat16)
        x8, scale, total = torch.ops.compiled_llm.add_rms_norm_fp8(x, residual, weight, 1e-5, "triton")
        # bit for bit against the unfused kernel: the same sum of squares in the same order
        normed, expected_total = torch.ops.compiled_llm.add_rms_norm(x, residual, weight, 1e-5, "triton")
        expected8, expected_scale = quantize_rows(normed)
        assert torch.equal(total, expected_total) and torch.equal(scale, expected_scale), f"seed {seed}"
        assert torch.equal(x8.view(torch.uint8), expected8.view(torch.uint8)), f"seed {seed}"
        # against torch's norm, whose sum runs in another order: a last-bit change of rstd can move one bf16 rounding,
        # so compare dequantized values (session 27 saw this test fail once when it asked torch's for bit equality)
        torch_normed, _ = torch.ops.compiled_llm.add_rms_norm(x, residual, weight, 1e-5, "torch")
        reference8, reference_scale = quantize_rows(torch_normed)
        torch.testing.assert_close(x8.float() * scale, reference8.float() * reference_scale, rtol=2.0**-3, atol=1e-3)
        weight8 = torch.randn(64, width, device="cuda").to(torch.float8_e4m3fn)
        weight_scale = torch.rand(64, device="cuda") / 100
        for backend in ("triton", "scaled_mm"):  # the decode GEMM (up to 16 rows) and cuBLASLt over pre-quantized rows
            got = torch.ops.compiled_llm.fp8_linear_quantized(x8, scale, weight8, weight_scale, None, torch.bfloat16, backend)
            want = torch.ops.compiled_llm.fp8_linear(normed, weight8, weight_scale, None, None, "torch")
            torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=2.0**-7 * want.float().abs().max().item())
