"""The Triton KV-cache write against the torch one: on the GPU, and under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import run_in_interpreter

from custom_ops.attention.kv_cache_write import write_kv_cache_fast
from custom_ops.attention.paged import write_kv_cache
from custom_ops.triton_runtime import triton_available


def check_against_torch(device: str, dtype=torch.bfloat16) -> None:
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    num_blocks, block_size, heads, head_dim, tokens = 9, 4, 3, 16, 11
    cache = torch.randn(num_blocks, 2, block_size, heads, head_dim, device=device).to(dtype)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    # keys as the model hands them over: a head-major transpose, not contiguous per token
    k = torch.randn(heads, tokens, head_dim, device=device).to(dtype).transpose(0, 1)
    v = torch.randn(tokens, heads, head_dim, device=device).to(dtype)
    write_kv_cache(k, v, expected, slots)
    write_kv_cache_fast(k, v, cache, slots)
    assert torch.equal(cache, expected), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_write_on_gpu():
    check_against_torch("cuda")
    check_against_torch("cuda", torch.float32)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_write_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_kv_cache_write as t; "
        "t.check_against_torch('cpu', torch.float32)"
    )
