"""argmax_rows (greedy decoding's argmax in two Triton launches) against torch.argmax: random logits,
maxima tied within a slice and across slices (the first index wins), rows of -inf, on the GPU and under
TRITON_INTERPRET=1."""

from __future__ import annotations

import random

import pytest
import torch

from custom_ops.argmax.triton_argmax import CHUNK, MIN_VOCAB, argmax_rows
from custom_ops.triton_runtime import triton_available
from test_linear_op import run_in_interpreter


def check_argmax(device: str, dtype: torch.dtype, cases: int = 4) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for case in range(cases):
        rows, vocab = rng.randint(1, 5), rng.choice([MIN_VOCAB, 3 * CHUNK + rng.randint(1, CHUNK - 1), 49152])
        logits = torch.randn(rows, 2 * vocab, device=device).to(dtype)[:, ::2] if case % 2 else torch.randn(
            rows, vocab, device=device
        ).to(dtype)  # odd cases: a strided view, which torch.argmax takes and the kernels leave to it
        top = logits.float().max().item() + 1.0
        logits[0, [rng.randrange(vocab), rng.randrange(vocab), rng.randrange(CHUNK)]] = top  # ties: first wins
        if rows > 1:
            logits[1] = float("-inf")
            logits[-1, rng.randrange(CHUNK) + CHUNK] = top  # two maxima in one slice
            logits[-1, rng.randrange(CHUNK) + CHUNK] = top
        got = argmax_rows(logits)
        assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1)), f"seed {seed}, case {case}"
    small = torch.randn(3, MIN_VOCAB - 1, device=device).to(dtype)  # torch.argmax's own case
    assert torch.equal(argmax_rows(small), small.argmax(dim=-1))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_argmax_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_argmax as t; "
        "t.check_argmax('cpu', torch.float32); t.check_argmax('cpu', torch.bfloat16)"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_argmax_on_gpu(dtype):
    check_argmax("cuda", dtype, cases=20)


def test_argmax_names_the_shape_it_takes():
    with pytest.raises(ValueError, match=r"logits \[rows, vocab\]; got shape \(2, 3, 4\)"):
        argmax_rows(torch.randn(2, 3, 4))
