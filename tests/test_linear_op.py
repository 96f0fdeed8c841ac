"""compiled_llm::linear / linear_silu_mul and their backends against a float64 reference; the linear and
norm passes in a compiled model against HF. The Triton GEMV runs on the GPU and, on CPU, under TRITON_INTERPRET=1."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import custom_ops.linear  # noqa: F401  (registers the op)
from compiled_llm import compile_model
from conftest import error_at_unit_scale, random_prompt, relative_error, run_in_interpreter, tiny_model
from custom_ops.linear.triton_gemv import MAX_ROWS, gemv
from custom_ops.triton_runtime import triton_available
from fx_passes.kernel_backend import resolve_linear_backend

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the output's norm


def silu_mul_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    gate_up = x.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    gate, up = gate_up.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def check_gemv(device: str, dtype: torch.dtype, cases: int = 6, max_n: int = 300) -> None:
    """Random shapes (K a multiple of the tile or not, any M up to MAX_ROWS, N odd or even, up to `max_n`), with and
    without bias; plain and with the SiLU-gated epilogue."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for case in range(cases):
        # One row loads whole rows up to K = 4096 and 2048 columns at a time beyond, 1024 where a whole row's power
        # of 2 would be over a quarter masked (2,880: three steps, the last partial); more rows, the loop.
        wide = rng.choice([4096, rng.randint(4097, 6000)])
        k = rng.choice([64, 576, 2880, wide, rng.randint(1, 1500)])
        m, n = rng.choice([1, rng.randint(2, MAX_ROWS)]), rng.randint(1, max_n)
        if case == 0:  # the one-row tile of 1024-column steps, every run
            m, k = 1, 2880
        x = torch.randn(m, k, device=device).to(dtype)
        weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
        bias = torch.randn(n, device=device).to(dtype) if case % 2 else None
        expected = x.double() @ weight.double().T + (bias.double() if bias is not None else 0)
        error = error_at_unit_scale(gemv(x, weight, bias=bias), expected)
        assert error < TOLERANCE[dtype], f"seed {seed}: M={m} N={n} K={k} bias={bias is not None}: {error}"
        gate_up_weight = (torch.randn(2 * n, k, device=device) / k**0.5).to(dtype)
        gate_up_bias = torch.randn(2 * n, device=device).to(dtype) if case % 2 else None
        y = gemv(x, gate_up_weight, bias=gate_up_bias, silu_mul=True)
        error = error_at_unit_scale(y, silu_mul_reference(x, gate_up_weight, gate_up_bias))
        assert y.shape == (m, n) and error < TOLERANCE[dtype], f"seed {seed}: silu_mul M={m} N={n} K={k}: {error}"
        # A first load shorter than K, then a loop whose last tile is partial; a tile without PREFETCH_K.
        for tile in ({"BLOCK_N": rng.choice([1, 2, 4]), "BLOCK_K": 256, "PREFETCH_K": 512, "num_warps": 4},
                     {"BLOCK_N": 2, "BLOCK_K": 128, "num_warps": 4}):  # fmt: skip
            error = error_at_unit_scale(gemv(x, weight, bias=bias, **tile), expected)
            assert error < TOLERANCE[dtype], f"seed {seed}: {tile} M={m} N={n} K={k}: {error}"


def check_linear_op(device: str, dtype: torch.dtype) -> None:
    """Each backend of the op against float64, on the one-row calls the GEMV takes and on larger ones."""
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    weight = (torch.randn(96, 1100, device=device) / 1100**0.5).to(dtype)
    bias = torch.randn(96, device=device).to(dtype)
    for shape in [(1, 1, 1100), (1, 1100), (1, 5, 1100), (7, 1100)]:
        x = torch.randn(*shape, device=device).to(dtype)
        expected = x.double() @ weight.double().T + bias.double()
        for backend in ("torch", "triton", "onednn"):
            y = torch.ops.compiled_llm.linear(x, weight, bias, backend)
            assert y.shape == (*shape[:-1], 96) and y.dtype == dtype
            assert relative_error(y, expected) < TOLERANCE[dtype], f"seed {seed}: {backend} {shape}"
            y = torch.ops.compiled_llm.linear_silu_mul(x, weight, bias, backend)
            assert y.shape == (*shape[:-1], 48) and y.dtype == dtype
            expected_act = silu_mul_reference(x, weight, bias)
            assert relative_error(y, expected_act) < TOLERANCE[dtype], f"seed {seed}: silu_mul {backend} {shape}"


def check_float64_is_not_rounded() -> None:
    """float64 calls of the triton backend leave the float32 kernels to torch: as exact as F.linear."""
    weight = torch.randn(64, 300, dtype=torch.float64)
    for rows in (1, 4):  # the GEMV's calls and the cuBLAS + activation kernel ones
        x = torch.randn(rows, 300, dtype=torch.float64)
        torch.testing.assert_close(torch.ops.compiled_llm.linear(x, weight, None, "triton"), F.linear(x, weight))
        expected = silu_mul_reference(x, weight, None)
        torch.testing.assert_close(torch.ops.compiled_llm.linear_silu_mul(x, weight, None, "triton"), expected)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_gemv_in_the_interpreter():
    # N up to 64, not 300: each program owns BLOCK_N rows (1, 2 or 4 here), and the interpreter runs the programs one
    # after another, so N sets the time, not the paths: a last tile part masked needs only an N the tile leaves over.
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_linear_op as t; "
        "t.check_gemv('cpu', torch.float32, max_n=64); t.check_linear_op('cpu', torch.float32); "
        "t.check_float64_is_not_rounded()"
    )


def test_gemv_refuses_what_it_cannot_compute():
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="weight"):
        gemv(x, torch.randn(8, 32))  # K does not match
    with pytest.raises(ValueError, match="bias"):
        gemv(x, torch.randn(16, 64), bias=torch.randn(32)[::2])  # a strided bias
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.randn(MAX_ROWS + 1, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="even"):
        gemv(x, torch.randn(7, 64), silu_mul=True)  # no [gate; up] halves
    with pytest.raises(ValueError, match="K > 0"):
        gemv(torch.randn(1, 0), torch.randn(8, 0))  # no loop step, so it would store before waiting (PDL)
    with pytest.raises(ValueError, match="float32"):
        gemv(x.double(), torch.randn(8, 64, dtype=torch.float64))  # it accumulates in float32


def test_linear_op_backends_on_cpu():
    check_linear_op("cpu", torch.float32)  # without the interpreter the triton backend runs F.linear


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_and_linear_op_on_gpu(dtype):
    check_gemv("cuda", dtype, cases=20)
    check_linear_op("cuda", dtype)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_ops_in_a_compiled_model():
    """Inductor over the linear and norm ops (CPU runs their torch code): every linear routed through the
    op, every norm fused, logits and greedy tokens as HF's; with `torch` the linears stay aten ops."""
    model = tiny_model("llama", seed=3)
    ids = random_prompt(12, seed=4)
    cm = compile_model(model, linear_backend="triton", norm_backend="triton", max_batch_size=2)
    layers = model.config.num_hidden_layers
    assert cm.report.pass_sites("insert_linear_op") == 4 * layers + 1  # qkv, o, gate/up, down; the LM head
    assert cm.report.pass_sites("fuse_rms_norm") == 2 * layers + 1
    assert cm.report.pass_sites("fuse_linear_silu_mul") == layers
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        assert relative_error(cm(ids).logits, expected) < 1e-5
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), hf)
    plain = compile_model(model, linear_backend="torch", compile_backend="eager", max_batch_size=2)
    assert plain.report.pass_sites("insert_linear_op") == 0


@pytest.mark.skipif(resolve_linear_backend("auto", "cpu")[0] != "onednn", reason="auto takes oneDNN on x86-64 only")
def test_onednn_linears_in_a_compiled_model():
    """A CPU model's float32 linears of the shapes oneDNN serves faster go to it under `auto` (the activation
    left to Inductor, which fuses it into one kernel), with HF's logits and greedy tokens; a bfloat16
    model's stay aten ops."""
    model = tiny_model("llama", seed=7)
    ids = random_prompt(12, seed=8)
    cm = compile_model(model, max_batch_size=2, compile_backend="eager")
    layers = model.config.num_hidden_layers
    # Wider than deep: qkv, gate/up and the LM head; o and down ([64, 64], [64, 128]) stay aten ops.
    assert cm.report.pass_sites("insert_linear_op") == 2 * layers + 1
    assert cm.report.pass_sites("fuse_linear_silu_mul") == 0
    assert "-> onednn (auto: CPU model, oneDNN available)" in str(cm.report)
    with torch.no_grad():
        assert relative_error(cm(ids).logits, model(ids, use_cache=False).logits) < 1e-5
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), hf)
    half = compile_model(tiny_model("llama").bfloat16(), linear_backend="onednn", compile_backend="eager", max_batch_size=1)
    assert half.report.pass_sites("insert_linear_op") == 0


def test_onednn_backend_leaves_what_it_cannot_run_to_torch():
    """Calls oneDNN's float32 path does not take run F.linear, with its results and its errors."""
    x, weight = torch.randn(3, 40, dtype=torch.float64), torch.randn(8, 40, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.compiled_llm.linear(x, weight, None, "onednn"), F.linear(x, weight))
    strided = torch.randn(40, 8).T  # not contiguous
    torch.testing.assert_close(torch.ops.compiled_llm.linear(x.float(), strided, None, "onednn"), F.linear(x.float(), strided))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        torch.ops.compiled_llm.linear(x.float(), torch.randn(8, 41), None, "onednn")


def check_kernels_in_a_model() -> None:
    """The GEMV (plain and with the SiLU epilogue) and the norm kernel serving a model's decode steps (one-token linears)."""
    model = tiny_model("llama", seed=5)
    ids = random_prompt(10, seed=6)
    cm = compile_model(model, linear_backend="triton", norm_backend="triton", compile_backend="eager", max_batch_size=1)
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), hf)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernels_in_a_model_in_the_interpreter():
    run_in_interpreter("import sys; sys.path.insert(0, 'tests'); import test_linear_op as t; t.check_kernels_in_a_model()")


def test_report_says_how_kernels_launch(monkeypatch):
    """The compile report's line on PDL, for each case (GPU capability and the switch patched: no GPU here)."""
    import custom_ops.triton_runtime as runtime

    cuda = torch.device("cuda", 0)
    assert runtime.kernel_launch_mode(torch.device("cpu")) == ""
    monkeypatch.setattr(runtime, "triton_available", lambda: True)
    monkeypatch.setattr(runtime, "_has_pdl", lambda index: True)
    assert runtime.kernel_launch_mode(cuda).startswith("programmatic dependent launch")
    monkeypatch.setattr(runtime, "_has_pdl", lambda index: False)
    assert "compute capability 9.0" in runtime.kernel_launch_mode(cuda)
    monkeypatch.setattr(runtime, "_PDL_DISABLED", True)
    assert "COMPILED_LLM_DISABLE_PDL=1" in runtime.kernel_launch_mode(cuda)
    monkeypatch.setattr(runtime, "triton_available", lambda: False)
    assert "not installed" in runtime.kernel_launch_mode(cuda)
    cm = compile_model(tiny_model("llama"), compile_backend="eager", max_batch_size=1)
    assert "triton kernels" not in str(cm.report)  # a CPU model: nothing to say
