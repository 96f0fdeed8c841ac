"""compiled_llm::add_rms_norm_linear and the fuse_add_rms_norm_linear pass: the GEMV with the residual add and RMSNorm
in its prologue against float64, in Triton's interpreter on CPU and on the GPU; the pass's sites and a model's tokens
against HF."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import error_at_unit_scale, random_prompt, run_in_interpreter, tiny_model

import fx_passes
from compiled_llm import compile_model
from custom_ops.linear.norm_linear import reference_add_rms_norm_linear
from custom_ops.linear.triton_gemv import launch_gemv
from custom_ops.triton_runtime import triton_available

ops = torch.ops.compiled_llm
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPS = 1e-6


def expected(x, residual, norm_weight, weight, bias, silu_mul):
    """The op's outputs in float64, from the same inputs."""
    return reference_add_rms_norm_linear(*(t.double() if t is not None else None for t in (x, residual, norm_weight)),
                                         EPS, weight.double(), bias.double() if bias is not None else None, silu_mul)  # fmt: skip


def check_fused_gemv(device: str, dtype: torch.dtype, cases: int = 4, max_n: int = 48) -> None:
    """One row: the op (its untuned GEMV tile) and GEMV launches of other tiles (a first load shorter than K, then a
    loop whose last step is partial) against float64, for y and the norm's two outputs; plain and gated."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for case in range(cases):
        k = [2880, 64, rng.randint(4097, 5000), rng.randint(1, 700)][case % 4]  # K > 4096: two steps of the sum
        n, silu_mul, bias = rng.randint(1, max_n), case % 2 == 1, case % 3 == 0
        x = torch.randn(1, 1, k, device=device).to(dtype)  # [1, T, H] as a model's graph holds it
        residual = (3 * torch.randn(1, 1, k, device=device)).to(dtype)
        norm_weight = (1 + torch.randn(k, device=device) / 4).to(dtype)
        rows = 2 * n if silu_mul else n
        weight = (torch.randn(rows, k, device=device) / k**0.5).to(dtype)
        b = torch.randn(rows, device=device).to(dtype) if bias else None
        want = expected(x, residual, norm_weight, weight, b, silu_mul)
        what = f"seed {seed}: K={k} N={n} silu_mul={silu_mul} bias={bias}"
        y, normed, total = ops.add_rms_norm_linear(x, residual, norm_weight, EPS, weight, b, silu_mul, "triton")
        assert y.shape == (1, 1, n) and normed.shape == total.shape == x.shape, what
        for got, ref, name in zip((y, normed, total), want, ("y", "normed", "total")):
            error = error_at_unit_scale(got, ref)
            assert error < TOLERANCE[dtype], f"{what}: {name} {error}"
        for tile in ({"BLOCK_N": rng.choice([1, 2, 4]), "BLOCK_K": 256, "PREFETCH_K": 512, "num_warps": 4},
                     {"BLOCK_N": 2, "BLOCK_K": 128, "num_warps": 4}):  # fmt: skip
            total, normed = torch.empty(1, k, device=device, dtype=dtype), torch.empty(1, k, device=device, dtype=dtype)
            r2d = residual.view(1, k)
            y = launch_gemv(x.view(1, k), weight, None, b, silu_mul, norm=(r2d, norm_weight, total, normed, k, EPS),
                            **tile)  # fmt: skip
            for got, ref, name in zip((y, normed, total), want, ("y", "normed", "total")):
                error = error_at_unit_scale(got.view(ref.shape), ref)
                assert error < TOLERANCE[dtype], f"{what}, {tile}: {name} {error}"


def check_model_tokens(arch: str, compile_backend: str = "eager") -> None:
    """The pass in a compiled model: its sites, and greedy tokens equal to HF's (on CPU without the interpreter both
    halves of each fused op run as torch; under it, the GEMV's one-row calls run the fused kernel)."""
    model = tiny_model(arch, seed=5)
    ids = random_prompt(10, seed=6)
    compiled = compile_model(model, linear_backend="triton", norm_backend="triton", compile_backend=compile_backend,
                             max_batch_size=1, passes=fx_passes.with_norm_linear_fusion(fx_passes.DEFAULT_PIPELINE))  # fmt: skip
    sites = {result.name: result.sites for result in compiled.report.passes}
    # Two layers: the post-attention norm of each and the second layer's input norm (the first layer's has no residual
    # add; the final norm reads rows selected for the LM head first)
    assert sites["fuse_add_rms_norm_linear"] == 3, sites
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(compiled.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), hf)


@pytest.mark.parametrize("arch, compile_backend", [("llama", "eager"), ("qwen3_moe", "inductor")])
def test_the_pass_keeps_a_models_tokens(arch, compile_backend):
    """Llama: q/k/v and gate/up (with SiLU) take their norms; Qwen3-MoE: q/k/v and the router, through its rows view,
    while the experts read the op's norm (compiled by Inductor around the op)."""
    check_model_tokens(arch, compile_backend)


def test_the_pass_leaves_torch_norms_and_linears():
    compiled = compile_model(tiny_model("llama"), compile_backend="eager", max_batch_size=1, linear_backend="torch",
                             norm_backend="torch", passes=fx_passes.with_norm_linear_fusion(fx_passes.DEFAULT_PIPELINE))  # fmt: skip
    assert {r.name: r.sites for r in compiled.report.passes}["fuse_add_rms_norm_linear"] == 0


def test_the_op_on_cpu_is_the_reference():
    """Without the interpreter the `triton` backend runs the two ops' torch code: the reference's results."""
    torch.manual_seed(0)
    x, residual = torch.randn(3, 40), torch.randn(3, 40)
    norm_weight, weight, bias = torch.randn(40), torch.randn(20, 40), torch.randn(20)
    for silu_mul in (False, True):
        want = reference_add_rms_norm_linear(x, residual, norm_weight, EPS, weight, bias, silu_mul)
        for backend in ("torch", "triton"):
            got = ops.add_rms_norm_linear(x, residual, norm_weight, EPS, weight, bias, silu_mul, backend)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fused_gemv_in_the_interpreter():
    """The kernel against float64, then in a model's decode steps: Qwen3-MoE's, whose router reads its norm through a
    rows view (the interpreter runs programs one after another: N up to 16, one model)."""
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_norm_linear as t; "
        "t.check_fused_gemv('cpu', torch.float32, max_n=16); t.check_model_tokens('qwen3_moe'); "
        "import custom_ops.linear.norm_linear as nl; nl.MIN_ROWS_A_PROGRAM = 4; t.check_fused_gemv('cpu', torch.float32, 2, 9)"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_gemv_on_gpu(dtype):
    # Each case's K is its kernels' own compile (3 a case): 16 cases took 105-137 s on an H100
    check_fused_gemv("cuda", dtype, cases=8, max_n=5000)


def test_the_linear_tunings_see_the_linear_inside_the_fused_op():
    """The one-row GEMV's and the decode GEMM's tunings bucket the fused op's weight as they would the linear's (its
    calls run their tuned tiles): with its activation where it has one, 16-bit for the decode GEMM."""
    from custom_ops.linear import decode_gemm_tuning, gemv_tuning

    root = torch.nn.Module()
    root.norm, root.w, root.w_torch = torch.ones(128), torch.randn(96, 128).bfloat16(), torch.randn(32, 128)
    graph = torch.fx.Graph()
    x, r = graph.placeholder("x"), graph.placeholder("r")
    fused = graph.call_function(ops.add_rms_norm_linear.default,
                                (x, r, graph.get_attr("norm"), EPS, graph.get_attr("w"), None, True, "triton"))  # fmt: skip
    graph.call_function(ops.add_rms_norm_linear.default,
                        (x, r, graph.get_attr("norm"), EPS, graph.get_attr("w_torch"), None, False, "torch"))  # fmt: skip
    graph.output(fused)
    gm = torch.fx.GraphModule(root, graph)
    assert gemv_tuning.OneRowLinearTuning().buckets(gm) == [{"n": 96, "k": 128, "silu_mul": True}]
    rows = decode_gemm_tuning.LinearRowsTuning().buckets(gm)
    assert rows == [{"n": 96, "k": 128, "silu_mul": True, "rows": r} for r in decode_gemm_tuning.ROW_BUCKETS]


def test_bad_operands_are_refused_by_name():
    """Operands that do not fit are the two ops' errors, whichever backend: the norm's weight or residual named."""
    x = torch.randn(1, 40)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="weight of shape"):
            ops.add_rms_norm_linear(x, torch.randn(1, 40), torch.randn(39), EPS, torch.randn(8, 40), None, False, backend)
        with pytest.raises(ValueError, match="residual"):
            ops.add_rms_norm_linear(x, torch.randn(1, 41), torch.randn(40), EPS, torch.randn(8, 40), None, False, backend)
        with pytest.raises(RuntimeError):  # F.linear's own shape error
            ops.add_rms_norm_linear(x, torch.randn(1, 40), torch.randn(40), EPS, torch.randn(8, 39), None, False, backend)
