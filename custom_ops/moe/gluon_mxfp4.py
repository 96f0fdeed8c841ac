"""One token's MXFP4 expert GEMMs on tensor cores (gluon_mxfp4_kernels.mxfp4_experts_mma_kernel), then
triton_one_token_kernels.one_token_epilogue_kernel: triton_moe.grouped_gemm takes this path for a one-token call under a
tile with "mma" (an autotuner candidate, held to the reference before it may win).

The kernel writes every row of each pair's expert weight as float32 sums (gate and up rows alike, in the weight's
own order, so interleaved gate/up rows need no strided view), and the epilogue computes what the GEMV's does from
them. This module needs no triton to import.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.linear.gluon_int4 import gluon_available, nvidia_capability
from custom_ops.triton_runtime import pdl_launch_options

GROUP = 32  # columns an exponent, a kernel step
ROWS = 16  # channels a program: the MMA's 16-row side
MMA_DTYPES = (torch.bfloat16, torch.float16)  # what the decode writes


@functools.cache
def _kernels():
    from custom_ops.moe import gluon_mxfp4_kernels

    return gluon_mxfp4_kernels


def mma_launch(n: int, k: int, SPLIT: int = 2, UNROLL: int = 5) -> dict | None:
    """The kernel's constexprs for weights [E, n, k], or None where it does not take the shape: SPLIT (warps, each a
    slice of K) is halved until it divides the groups, UNROLL (steps a loop iteration) lowered until it divides a
    warp's groups (GPT-OSS's K = 2,880: 90 groups, 45 a warp at SPLIT 2)."""
    groups = k // GROUP if k % GROUP == 0 else 0
    if not groups or n % ROWS:
        return None
    split = SPLIT
    while split > 1 and groups % split:
        split //= 2
    unroll = max(u for u in range(1, max(1, UNROLL) + 1) if (groups // split) % u == 0)
    return {"ROWS": ROWS, "SPLIT": split, "UNROLL": unroll}


def takes(a: torch.Tensor, w: torch.Tensor, exponents: torch.Tensor) -> bool:
    """Whether the kernel runs this call: rows in bfloat16 or float16 on an NVIDIA GPU with mma.m16n8k16 (sm_80+),
    contiguous rows of x; bytes and exponents with unit last stride, the bytes read as 4-byte words (rows and experts
    4-byte aligned)."""
    if not (a.is_cuda and a.dtype in MMA_DTYPES and a.stride(-1) == 1 and gluon_available()):
        return False
    if nvidia_capability(a.device.index if a.device.index is not None else torch.cuda.current_device()) < (8, 0):
        return False
    aligned = w.data_ptr() % 4 == 0 and w.stride(0) % 4 == 0 and w.stride(1) % 4 == 0
    formats = w.dtype == exponents.dtype == torch.uint8
    return formats and w.stride(2) == 1 and exponents.stride(2) == 1 and aligned


def launch_for(a: torch.Tensor, w: torch.Tensor, exponents: torch.Tensor, **tile) -> dict | None:
    """mma_launch at `tile`'s SPLIT and UNROLL for a call the kernel runs (takes), else None."""
    if not takes(a, w, exponents):
        return None
    return mma_launch(w.shape[1], 2 * w.shape[2], **{key: v for key, v in tile.items() if key in ("SPLIT", "UNROLL")})


def experts_mma(a: torch.Tensor, w: torch.Tensor, exponents: torch.Tensor, ids: torch.Tensor, top_k: int,
                a_per_token: bool, **tile) -> torch.Tensor:  # fmt: skip
    """raw [pairs, N] float32: a[p // top_k if a_per_token else p] . W[ids[p], n] for every row n of the MXFP4 bytes
    w [E, N, K / 2] with `exponents` [E, N, K / 32]; zeros for a pair whose id is outside [0, E). `tile`: SPLIT,
    UNROLL. Raises ValueError for a call the kernel does not take."""
    n = w.shape[1]
    launch = launch_for(a, w, exponents, **tile)
    if launch is None:
        raise ValueError(f"the MXFP4 experts MMA kernel does not take rows {list(a.shape)} {a.dtype} on {a.device} "
                         f"with bytes {list(w.shape)} (K a multiple of {GROUP}, N of {ROWS}, bf16/fp16 on an NVIDIA "
                         f"GPU)")  # fmt: skip
    pairs = ids.numel()
    raw = torch.empty(pairs, n, dtype=torch.float32, device=a.device)
    args, constexprs = kernel_arguments(launch, a, w, exponents, ids, top_k, a_per_token, raw)
    _kernels().mxfp4_experts_mma_kernel[(pairs * (n // ROWS),)](
        *args, **constexprs, num_warps=launch["SPLIT"], **pdl_launch_options(a)
    )
    return raw


def kernel_arguments(launch: dict, a, w, exponents, ids, top_k: int, a_per_token: bool,
                     raw: torch.Tensor) -> tuple[tuple, dict]:  # fmt: skip
    """The kernel's runtime arguments, in order, and its constexprs but USE_PDL (the launch's)."""
    runtime = (a, w, exponents, ids, raw, w.shape[1], top_k, w.shape[0], a.stride(0), w.stride(0), w.stride(1),
               exponents.stride(0), exponents.stride(1), raw.stride(0))  # fmt: skip
    return runtime, {"K": 2 * w.shape[2], "A_PER_TOKEN": a_per_token, **launch}
