"""The decode GEMM over 16-bit operands (triton_decode_gemm.decode_gemm: plain, and with the gated activation in its
epilogue) against a float64 reference, and `compiled_llm::linear`'s `triton` backend running it where the autotuner
chose it (op.TUNED_ROWS). On the GPU, and on a CPU under TRITON_INTERPRET=1. Its 8-bit operands are tested with their
formats (test_fp8_linear.py, test_int8_linear.py)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_interpreter

import custom_ops.linear  # noqa: F401  (registers the ops)
from custom_ops.triton_runtime import triton_available


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    out = F.linear(x.double(), weight.double(), bias.double() if bias is not None else None)
    if not silu_mul:
        return out
    gate, up = out.chunk(2, dim=-1)
    return F.silu(gate) * up


def assert_rounded_from(actual: torch.Tensor, expected: torch.Tensor, what) -> None:
    """Within a few roundings of the output's 16-bit dtype of the float64 result (the sums' order aside)."""
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    assert error <= 2.0**-6 * scale, (what, error, scale)


def check_decode_gemm(device: str, tiles: tuple[dict, ...], dtypes: tuple[torch.dtype, ...], cases: int = 5) -> None:
    """Random shapes (K and N multiples of the tile or not, 1 to 64 rows: each padding, 16, 32 and 64) in `dtypes` by
    turns, with and without a bias, plain and gated, at each of `tiles` (a split of K on the plain ones only)."""
    from custom_ops.linear.triton_decode_gemm import decode_gemm

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    for case in range(cases):
        rows = (1, 17, 64)[case] if case < 3 else rng.randint(1, 64)
        k = rng.choice([64, 256, rng.randint(1, 700)])
        n = rng.choice([64, rng.randint(1, 200)])
        dtype = dtypes[case % len(dtypes)]
        x = torch.randn(rows, k, generator=generator).to(device, dtype)
        for silu_mul in (False, True):
            weight = (torch.randn(2 * n if silu_mul else n, k, generator=generator) / k**0.5).to(device, dtype)
            bias = torch.randn(weight.shape[0], generator=generator).to(device, dtype) if case % 3 else None
            expected = reference(x.cpu(), weight.cpu(), bias.cpu() if bias is not None else None, silu_mul)
            for tile in tiles:
                if silu_mul and tile.get("SPLIT_K", 1) > 1:
                    continue
                actual = decode_gemm(x, weight, bias, dtype, silu_mul=silu_mul, **tile)
                assert actual.dtype == dtype
                assert_rounded_from(actual.cpu(), expected, (seed, case, rows, n, k, dtype, silu_mul, tile))


def check_the_op_runs_it_where_tuned(device: str, dtype: torch.dtype) -> None:
    """With a tile installed for (N, K, 16 rows, silu_mul), the `triton` linear of 2 to 16 rows calls the decode GEMM
    (counted) and matches the reference; one row (the GEMV's), 17 rows (another bucket) and an untuned shape do not
    call it."""
    from custom_ops.linear import op

    calls = []
    decode_gemm = op.decode_gemm
    op.decode_gemm = lambda *args, **kwargs: calls.append(args[0].shape[0]) or decode_gemm(*args, **kwargs)
    generator = torch.Generator().manual_seed(random.randrange(1 << 30))
    n, k = 48, 96
    weight = (torch.randn(2 * n, k, generator=generator) / k**0.5).to(device, dtype)
    bias = torch.randn(2 * n, generator=generator).to(device, dtype)
    index = weight.get_device()
    op.TUNED_ROWS[(index, 2 * n, k, 16, False)] = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}
    op.TUNED_ROWS[(index, 2 * n, k, 16, True)] = {"BLOCK_N": 32, "BLOCK_K": 32}
    for rows in (1, 3, 16, 17):
        x = torch.randn(2, rows, k, generator=generator).to(device, dtype)[0]  # 2-D, from a 3-D batch's first
        for silu_mul in (False, True):
            name = "linear_silu_mul" if silu_mul else "linear"
            actual = getattr(torch.ops.compiled_llm, name)(x.unsqueeze(0), weight, bias, "triton")
            expected = reference(x.cpu(), weight.cpu(), bias.cpu(), silu_mul).unsqueeze(0)
            assert_rounded_from(actual.cpu(), expected, (rows, silu_mul))
    assert calls == [3, 3, 16, 16], calls
    calls.clear()
    other = torch.randn(2 * n, k + 1, generator=generator).to(device, dtype)
    torch.ops.compiled_llm.linear(torch.randn(3, k + 1, generator=generator).to(device, dtype), other, None, "triton")
    assert calls == []


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_decode_gemm_in_the_interpreter():
    # float16 only: the interpreter's tl.dot multiplies bfloat16 operands as if their bits were integers.
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_decode_gemm as t; "
        "t.check_decode_gemm('cpu', ({}, {'BLOCK_N': 16, 'BLOCK_K': 32}, {'BLOCK_N': 32, 'BLOCK_K': 64, 'SPLIT_K': 3}),"
        " (torch.float16,), cases=4); t.check_the_op_runs_it_where_tuned('cpu', torch.float16)"
    )


@pytest.mark.gpu
def test_every_16_bit_tile_of_the_tuning_on_the_gpu():
    from custom_ops.linear.decode_gemm_tuning import TILES_16BIT

    check_decode_gemm("cuda", TILES_16BIT, (torch.bfloat16, torch.float16), cases=3)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_the_op_runs_the_decode_gemm_where_tuned_on_the_gpu(monkeypatch):
    from custom_ops.linear import op

    monkeypatch.setattr(op, "TUNED_ROWS", {})
    monkeypatch.setattr(op, "decode_gemm", op.decode_gemm)  # the check wraps it
    check_the_op_runs_it_where_tuned("cuda", torch.bfloat16)


@pytest.mark.gpu
def test_the_gated_decode_gemm_replays_in_a_cuda_graph():
    """Captured once, replayed on new rows: the output follows the rows each time."""
    from custom_ops.linear.triton_decode_gemm import decode_gemm

    weight = torch.randn(2 * 320, 1000, device="cuda", dtype=torch.bfloat16) / 1000**0.5
    x = torch.randn(40, 1000, device="cuda", dtype=torch.bfloat16)
    decode_gemm(x, weight, None, torch.bfloat16, silu_mul=True)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_gemm(x, weight, None, torch.bfloat16, silu_mul=True)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert_rounded_from(out.cpu(), reference(x.cpu(), weight.cpu(), None, True), "replay")
