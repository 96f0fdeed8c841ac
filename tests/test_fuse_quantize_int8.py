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


def two_norms(shared_read: bool):
    """make_fx graph of two add_rms_norms, each feeding int8_linears of one smooth (the first two of them); with
    `shared_read`, one get_attr node reads the smooth for every linear (as a CSE of the graph's reads leaves it)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from custom_ops.linear.int8 import quantize_weight

    generator = torch.Generator().manual_seed(3)
    smooth, norm_weight = (torch.rand(64, generator=generator) + 0.5 for _ in range(2))
    weight8, weight_scale = quantize_weight(torch.randn(64, 64, generator=generator), smooth)
    ops = torch.ops.compiled_llm

    def layers(x, r):
        y, h = ops.add_rms_norm(x, r, norm_weight, 1e-5, "torch")
        a = ops.int8_linear(y, weight8, weight_scale, smooth, None, "torch")
        y2, h2 = ops.add_rms_norm(a, h, norm_weight, 1e-5, "torch")
        return ops.int8_linear(y2, weight8, weight_scale, smooth, None, "torch") + h2

    inputs = tuple(torch.randn(3, 64, generator=generator) for _ in range(2))
    gm = make_fx(layers, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    if shared_read:
        reads = [n.args[3] for n in gm.graph.nodes if n.target is ops.int8_linear.default]
        for read in reads[1:]:
            read.replace_all_uses_with(reads[0])
            gm.graph.erase_node(read)
    return gm, inputs


@pytest.mark.parametrize("shared_read", [False, True])
def test_each_norm_reads_the_smooth_before_it_and_the_values_do_not_move(shared_read):
    from fx_passes.fuse_norm_quantize_int8 import fuse_norm_quantize_int8

    gm, inputs = two_norms(shared_read)
    before = gm(*inputs)
    assert fuse_norm_quantize_int8(gm, None).sites == 2
    gm.graph.lint()  # every node after its inputs
    gm.recompile()
    assert torch.equal(gm(*inputs), before)


def traced(fn, *inputs):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)


def test_what_the_int8_fusions_leave_alone():
    """A norm read by int8 linears of two smooths (x is quantized once for all its readers), a norm also read by
    something else, and a gate before a down projection on the `int_mm` backend (a GPU kept to torch's ops): no site."""
    from custom_ops.linear.int8 import quantize_weight
    from fx_passes.fuse_norm_quantize_int8 import fuse_norm_quantize_int8
    from fx_passes.fuse_silu_mul_quantize_int8 import fuse_silu_mul_quantize_int8

    generator = torch.Generator().manual_seed(5)
    smooths = [torch.rand(64, generator=generator) + 0.5 for _ in range(2)]
    norm_weight = torch.rand(64, generator=generator) + 0.5
    weight8, weight_scale = quantize_weight(torch.randn(64, 64, generator=generator), smooths[0])
    ops = torch.ops.compiled_llm
    x, r = (torch.randn(3, 64, generator=generator) for _ in range(2))

    def two_smooths(x, r):
        y, h = ops.add_rms_norm(x, r, norm_weight, 1e-5, "torch")
        a = ops.int8_linear(y, weight8, weight_scale, smooths[0], None, "torch")
        return a + ops.int8_linear(y, weight8, weight_scale, smooths[1], None, "torch") + h

    def another_reader(x, r):
        y, h = ops.add_rms_norm(x, r, norm_weight, 1e-5, "torch")
        return ops.int8_linear(y, weight8, weight_scale, smooths[0], None, "torch") + y + h

    for fn in (two_smooths, another_reader):
        assert fuse_norm_quantize_int8(traced(fn, x, r), None).sites == 0

    def gate(gate_up, backend):
        g, u = gate_up.split([64, 64], dim=-1)
        return ops.int8_linear(torch.nn.functional.silu(g) * u, weight8, weight_scale, smooths[0], None, backend)

    gate_up = torch.randn(3, 128, generator=generator)
    assert fuse_silu_mul_quantize_int8(traced(lambda t: gate(t, "int_mm"), gate_up), None).sites == 0
    fused = traced(lambda t: gate(t, "torch"), gate_up)
    before = fused(gate_up)
    assert fuse_silu_mul_quantize_int8(fused, None).sites == 1  # the same graph on the reference backend
    fused.recompile()
    assert torch.equal(fused(gate_up), before)
