"""The Triton backend's decode launches as a GPU compiles them, inline PTX included (ex2.ftz; at one warp an fp8
cache's values converted before the MMA's shared-memory handoff), run on the CPU by tests/ptx_emulator.py and held to
the reference op. Triton's interpreter runs no PTX: test_triton_attention.py covers the rest of the kernel there."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import relative_error

import custom_ops  # noqa: F401
from custom_ops.attention import triton
from tests.paged_steps import random_step

pytestmark = pytest.mark.skipif(not triton.triton_available(), reason="triton is not installed")

ops = torch.ops.compiled_llm
LAUNCHES = {
    "one warp": {"TILE": 32, "num_warps": 1, "num_stages": 2, "ONE_LAUNCH": False},
    "4 warps": {"TILE": 32, "num_warps": 4, "num_stages": 2, "ONE_LAUNCH": False},
}


class EmulatedKernel:
    """paged_attention_kernel's stand-in: each launch compiled for sm_90a and emulated, a program at a time."""

    def __init__(self, edit_ptx=None):
        from custom_ops.attention.triton_kernel import paged_attention_kernel

        self.kernel, self.edit_ptx, self.launches = paged_attention_kernel, edit_ptx, []

    def __getitem__(self, grid):
        from ptx_emulator import run_kernel

        def launch(*args, num_warps=4, num_stages=3, **constexprs):
            self.launches.append(constexprs)
            arguments = dict(zip(self.kernel.arg_names, args))
            run_kernel(self.kernel, tuple(grid), num_warps, arguments, constexprs, self.edit_ptx, num_stages)

        return launch


def emulated_decode(monkeypatch, cache_dtype, sinks: bool, launch: str = "one warp",
                    edit_ptx=None) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """A decode step of 3 sequences (1-3 key tiles each) over Llama-like heads (8 over 2 KV heads, 64 wide): the
    emulated kernel's output, the reference op's and the seed."""
    from custom_ops.attention import triton_kernel

    monkeypatch.setattr(triton, "runs_ptx", lambda tensor: True)
    kernel = EmulatedKernel(edit_ptx)
    monkeypatch.setattr(triton_kernel, "paged_attention_kernel", kernel)
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    args, _ = random_step(random.Random(seed), [(40, 1), (17, 1), (70, 1)], 16, 8, 2, 64, torch.bfloat16, "cpu",
                          cache_dtype)  # fmt: skip
    head_sinks = torch.randn(8) if sinks else None
    expected = ops.paged_attention(*args[:3], args[3].clone(), *args[4:], 0, 0.125, 0, 0.0, head_sinks, "reference")
    out = torch.empty_like(args[0])
    triton.triton_paged_attention(out, *args, 0, 0.125, 0, 0.0, head_sinks, splits=1, launch=LAUNCHES[launch])
    (options,) = kernel.launches
    assert (options["IN_PTX"], options["VALUES_IN_PTX"]) == (True, launch == "one warp")
    return out, expected, seed


@pytest.mark.parametrize("launch", sorted(LAUNCHES))
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("sinks", [False, True])
def test_the_decode_in_ptx_matches_the_reference(monkeypatch, cache_dtype, sinks, launch):
    out, expected, seed = emulated_decode(monkeypatch, cache_dtype, sinks, launch)
    assert relative_error(out, expected) < 1e-2, f"seed {seed}"


def test_the_emulated_decode_fails_with_the_values_converted_out_of_order(monkeypatch):
    """The PTX conversion's element order matters: each register's two e4m3 pairs swapped, the output is wrong."""

    def swap(ptx: str) -> str:
        return ptx.replace("mov.b32 {lo, hi}", "mov.b32 {hi, lo}")

    out, expected, seed = emulated_decode(monkeypatch, torch.float8_e4m3fn, False, "one warp", swap)
    assert relative_error(out, expected) > 0.1, f"seed {seed}"
