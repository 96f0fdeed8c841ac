"""fuse_silu_mul_quantize_fp8: the SiLU gate writes the FP8 activations of the down projection it feeds. A pure
fusion: the logits equal the unfused graph's exactly, and compiled_llm::silu_mul_fp8 equals the activation then the
per-token quantization (the GPU kernel bit for bit)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

import custom_ops  # noqa: F401  (registers the ops)
from compiled_llm import compile_model
from custom_ops.linear.fp8 import quantize_rows
from custom_ops.linear.op import silu_and_mul
from fx_passes import DEFAULT_PIPELINE, with_fp8_fusions


def sites(compiled, name: str) -> int:
    (result,) = [p for p in compiled.report.passes if p.name == name]
    return result.sites


@pytest.mark.parametrize(("arch", "expected"), [("llama", 2), ("qwen3_moe", 0), ("gemma2", 0)])
def test_each_fp8_down_projection_reads_its_gate_quantized_and_the_logits_do_not_move(arch, expected):
    """2 layers: a Llama MLP each; the MoE model's experts stay in its dtype; Gemma's gate is GELU, not SiLU."""
    fields = {"compile_backend": "eager", "quantization": "fp8"}
    fused = compile_model(tiny_model(arch), passes=with_fp8_fusions(DEFAULT_PIPELINE, ("fuse_silu_mul_quantize_fp8",)), **fields)
    unfused = compile_model(tiny_model(arch), **fields)
    assert sites(fused, "fuse_silu_mul_quantize_fp8") == expected
    graph = fused.graph_module.graph
    assert sum(n.target is torch.ops.compiled_llm.silu_mul_fp8.default for n in graph.nodes) == expected
    assert not any(n.target is torch.ops.aten.silu.default for n in graph.nodes) or expected == 0
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, unfused(ids).logits)


def test_the_op_is_the_activation_then_the_quantization():
    gate_up = (torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(6)) * 4).bfloat16()
    x8, scale = torch.ops.compiled_llm.silu_mul_fp8(gate_up, "triton")  # on a CPU tensor: the reference
    expected8, expected_scale = quantize_rows(silu_and_mul(gate_up).reshape(10, 48))
    assert x8.shape == (2, 5, 48) and scale.shape == (2, 5, 1)
    assert torch.equal(x8.view(torch.uint8).reshape(10, 48), expected8.view(torch.uint8))
    assert torch.equal(scale.reshape(10, 1), expected_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("late_trigger", [False, True])  # where it lets the next kernel launch (PDL), not what it computes
def test_the_kernel_equals_the_activation_kernel_then_the_quantization_bit_for_bit(monkeypatch, late_trigger):
    from custom_ops import triton_runtime
    from custom_ops.linear.triton_silu_mul import triton_silu_mul, triton_silu_mul_quantized

    monkeypatch.setattr(triton_runtime, "FUSED_PRODUCERS_TRIGGER_LATE", late_trigger)

    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, width in ((1, 14336), (37, 1536), (300, 1000)):
        gate_up = (torch.randn(rows, 2 * width, generator=generator) * 3).to("cuda", torch.bfloat16)
        x8, scale = triton_silu_mul_quantized(gate_up)
        expected8, expected_scale = quantize_rows(triton_silu_mul(gate_up))
        assert torch.equal(scale, expected_scale)
        assert torch.equal(x8.view(torch.uint8), expected8.view(torch.uint8))
        # against torch's own activation: one bf16 rounding of silu may differ, so compare dequantized values
        reference8, reference_scale = quantize_rows(silu_and_mul(gate_up))
        torch.testing.assert_close(x8.float() * scale, reference8.float() * reference_scale, rtol=2.0**-3, atol=1e-3)


def traced(second_user: bool = False, input_scale: bool = False, backend: str = "triton"):
    """make_fx graph of split -> silu * mul -> fp8_linear (its nodes carry fake values, as captured graphs do)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from custom_ops.linear.fp8 import quantize_weight

    weight8, scale = quantize_weight(torch.randn(16, 24, generator=torch.Generator().manual_seed(9)))
    inputs = (torch.randn(5, 48, generator=torch.Generator().manual_seed(8)).bfloat16(), weight8, scale)
    inputs += (torch.tensor(0.01),) if input_scale else ()

    def mlp(gate_up, weight8, scale, *static):
        gate, up = torch.split(gate_up, [24, 24], -1)
        activation = torch.nn.functional.silu(gate) * up
        out = torch.ops.compiled_llm.fp8_linear(activation, weight8, scale, *(static or (None,)), None, backend)
        return (out, activation) if second_user else out

    return make_fx(mlp, tracing_mode="fake")(*inputs), inputs


@pytest.mark.parametrize(("case", "expected"), [
    ({}, 1), ({"second_user": True}, 0), ({"input_scale": True}, 0), ({"backend": "scaled_mm"}, 0),
])  # fmt: skip
def test_only_a_gate_read_by_nothing_but_a_dynamic_fp8_down_projection_fuses(case, expected):
    from fx_passes.fuse_silu_mul_quantize_fp8 import fuse_silu_mul_quantize_fp8

    gm, inputs = traced(**case)
    before = gm(*inputs)
    assert fuse_silu_mul_quantize_fp8(gm, None).sites == expected
    gm.graph.lint()
    gm.recompile()
    remaining = {n.target for n in gm.graph.nodes}
    assert (torch.ops.aten.silu.default in remaining) == (expected == 0)
    after = gm(*inputs)
    for a, b in zip(before if isinstance(before, tuple) else (before,), after if isinstance(after, tuple) else (after,)):
        assert torch.equal(a, b)  # a pure fusion: the same values, bit for bit
