"""The launch of gluon_int4_kernels.int4_mma_kernel: int4_linear, or nvfp4_linear (`nvfp4_mma`), for up to 16 rows of
x on tensor cores, decoding the codes in the MMA's own register layout (a decode batch; triton_int4.py's and
triton_nvfp4.py's GEMV and GEMM are the other kernels).

triton_int4.int4_gemv / int4_gemm (and triton_nvfp4's) hand a call over by default (their mma_default) or where the
autotuner chose it (the `mma` candidates, held to the reference before they may win). This module needs no triton to
import; the kernel's module is imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from custom_ops.linear.triton_int4 import part_ends, triton_cdiv
from custom_ops.triton_runtime import pdl_launch_options

MAX_ROWS = 16  # x's rows: the MMA's 8-column side, twice
MMA_DTYPES = (torch.bfloat16, torch.float16)  # what the PTX decode writes
# One row's steps whose codes the untuned int4 launch loads before the wait for the previous kernel (mma_launch's
# PRELOAD): 4 cut each of Llama-8B's linears by 8-19% on an H100 (mma_default); 8 measured no better on o and q/k/v. A
# step of 32 channels costs 8 registers a thread: with every step preloaded (sm_90a, int4 offsets), o's 16 x 8 launch
# takes 80 registers (62 without), gate/up's 32 x 4 takes 222 (140) and down's 32 x 8 255 and spills (142).
PRELOAD = 4


@functools.cache
def gluon_available() -> bool:
    """Triton with Gluon (3.5+), whose mma_v2 and layouts the kernel is written in."""
    return (
        importlib.util.find_spec("triton") is not None
        and importlib.util.find_spec("triton.experimental.gluon") is not None
    )


@functools.cache
def mma_kernels():
    from custom_ops.linear import gluon_int4_kernels

    return gluon_int4_kernels


def mma_launch(m: int, n: int, k: int, group_size: int, smooth_rows: list[int], ROWS: int = 16, SPLIT: int = 4,
               UNROLL: int = 2, PREFETCH: bool = False, PRELOAD: int = 0) -> dict | None:  # fmt: skip
    """The kernel's constexprs for x [m, k] @ W [n, k]^T, or None where it does not take the shape. ROWS (channels a
    program, 16 to 64) is halved until it divides N and every smooth part, SPLIT (warps, each a slice of K) and UNROLL
    (groups a loop iteration) until they divide the groups; groups of a power of 2 from 32 to 512 columns (a thread's
    4 code bytes of a decode call must be contiguous columns: tests/test_int4_mma.py checks the layout). PRELOAD (one
    row only, at most a warp's steps): steps whose codes load into registers before the wait for the previous kernel."""
    groups = k // group_size if group_size and k % group_size == 0 else 0
    if not (0 < m <= MAX_ROWS and 32 <= group_size <= 512 and group_size & (group_size - 1) == 0 and groups):
        return None
    rows = ROWS
    while rows > 16 and (n % rows or any(part % rows for part in smooth_rows)):
        rows //= 2
    if n % rows or any(part % rows for part in smooth_rows):
        return None
    split = SPLIT
    while split > 1 and groups % split:
        split //= 2
    unroll = UNROLL
    while unroll > 1 and (groups // split) % unroll:
        unroll //= 2
    # One row stages x * smooth in shared memory, 2 bytes a column (a warp's groups padded to a power of 2): up to 96 KB
    # of it, so that programs still share an SM; and unrolls its steps: up to 32 a warp (more grew registers past 180
    # and the compile past a minute, where the steps run as a loop instead)
    staged = (1 << (groups // split - 1).bit_length()) * split * group_size * 2
    one_row = m == 1 and staged <= 96 * 1024 and groups // split <= 32
    return {"ROWS": rows, "SPLIT": split, "UNROLL": unroll, "COLS": 8 if m <= 8 else 16, "ONE_ROW": one_row,
            "PREFETCH": PREFETCH, "PRELOAD": min(PRELOAD, groups // split) if one_row else 0}  # fmt: skip


@functools.cache
def nvidia_capability(device_index: int) -> tuple[int, int]:
    """The CUDA device's compute capability, (0, 0) on ROCm: the kernel is PTX (mma.m16n8k16 needs sm_80, the bulk
    prefetch sm_90)."""
    if torch.version.hip is not None:
        return (0, 0)
    return torch.cuda.get_device_capability(device_index)


def prefetch_takes(qweight: torch.Tensor) -> bool:
    """Whether the kernel's bulk L2 prefetch may read these codes: its sources must be 16-byte aligned (a row's slices
    are multiples of 16 bytes where the groups are of 32 columns or more)."""
    return qweight.data_ptr() % 16 == 0 and qweight.stride(0) % 16 == 0


def mma_default(m: int, n: int, k: int, e2m1: bool = False, group_size: int = 128) -> dict:
    """The untuned launch for [m] rows (up to MAX_ROWS) of weight [n, k] in groups of `group_size` columns (`e2m1`:
    NVFP4's): the leaders of H100 sweeps over Llama-8B's shapes (BENCHMARKS.md). At one row, int4's first PRELOAD
    steps load before the wait: q/k/v 7.7 us at 32 x 4 (9.0 before), o 6.9 at 16 x 8 (8.4), gate/up 26.2 at 32 x 4
    (28.7), down 16.4 at 32 x 8 (20.2). Groups of 32 (GGUF's Q4_K) leave one row to the Triton GEMV: 124 us a
    Llama-8B layer against 171 here. At 8 and 16 rows the kernel beat the GEMM 2-6x. NVFP4's decode, more
    instructions a weight, leads with 16 channels and 8 warps at one row everywhere, the small linears' codes
    prefetched into L2 (q/k/v 9.8 against 11.3 at int4's launch, o 9.0 against 10.6, gate/up 32.4 against 36.1,
    down 20.9 against 21.8)."""
    if m == 1 and e2m1:
        return {"MMA": True, "ROWS": 16, "SPLIT": 8, "PREFETCH": n * k <= 32 * 2**20}
    if m == 1 and group_size < 64:
        return {"MMA": False}
    long = k >= 8192
    if m == 1:  # a wide linear has programs enough with 4 warps a program, a long one takes 32 channels a program
        return {"MMA": True, "ROWS": 32 if n > k or long else 16, "SPLIT": 4 if n > k else 8, "PRELOAD": PRELOAD}
    wide = n >= 16384
    return {"MMA": True, "ROWS": 32 if wide or long else 64, "SPLIT": 4 if wide else 8}


def tensor_core_decode(tile: dict, tuned: dict, rows, qweight, scales, zeros, smooth, smooth_rows, bias,
                       group_size: int | None) -> torch.Tensor | None:  # fmt: skip
    """y by this kernel where the tuner's candidate `tile`, else the `tuned` launch, else mma_default chose it ({"MMA":
    True, ...}), else None ({"MMA": False}, or a launch of the Triton kernels). A candidate the kernel does not take
    raises (the tuner rules it out); a tuned or default launch it does not take (another dtype, more rows) leaves the
    call to the Triton kernels. int4_linear's arguments, or nvfp4_linear's where `group_size` is None (run_launch)."""
    if rows.shape[0] > MAX_ROWS and not tile:  # prefill: nothing to decide
        return None
    choice = tile or tuned or untuned_launch(rows, qweight, group_size)
    if not choice.get("MMA"):
        return None
    launch = launch_for(rows, qweight, smooth, smooth_rows, group_size, choice)
    if launch is None:
        if tile:
            raise not_taken(rows, qweight, group_size or 16)
        return None
    return run_launch(launch, rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)


def untuned_launch(rows: torch.Tensor, qweight: torch.Tensor, group_size: int | None) -> dict:
    """mma_default for a call: int4's in groups of `group_size`, NVFP4's where it is None."""
    m, n, k = rows.shape[0], qweight.shape[0], 2 * qweight.shape[1]
    return mma_default(m, n, k, e2m1=True) if group_size is None else mma_default(m, n, k, group_size=group_size)


def launch_for(rows: torch.Tensor, qweight: torch.Tensor, smooth, smooth_rows: list[int], group_size: int | None,
               tile: dict) -> dict | None:  # fmt: skip
    """mma_launch for a call whose tensors int4.triton_takes (or, `group_size` None, nvfp4.triton_takes: its step is
    nvfp4_step's) accepted, with `tile`'s ROWS, SPLIT, UNROLL, PRELOAD, PREFETCH (off
    unless the codes are 16-byte aligned and the GPU is a Hopper); None unless the rows are bfloat16 or float16 (what
    the PTX decode writes) on an NVIDIA GPU with mma.m16n8k16 (sm_80+) and the codes fit 32-bit offsets."""
    if not (rows.is_cuda and rows.dtype in MMA_DTYPES and qweight.numel() < 2**31 and gluon_available()):
        return None
    capability = nvidia_capability(rows.device.index if rows.device.index is not None else torch.cuda.current_device())
    if capability < (8, 0):
        return None
    tile = {key: value for key, value in tile.items() if key in ("ROWS", "SPLIT", "UNROLL", "PREFETCH", "PRELOAD")}
    tile["PREFETCH"] = tile.get("PREFETCH", False) and capability >= (9, 0) and prefetch_takes(qweight)
    m, n, k = rows.shape[0], qweight.shape[0], 2 * qweight.shape[1]
    step = nvfp4_step(k) if group_size is None else group_size
    return mma_launch(m, n, k, step, list(smooth_rows) if smooth is not None else [], **tile)


def int4_mma(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int, **tile) -> torch.Tensor:
    """y [M, N] for rows [M, K], M <= 16 (int4.triton_takes checked what the kernel reads); `tile`:
    mma_launch's ROWS, SPLIT, UNROLL, PREFETCH, PRELOAD. Raises ValueError for a call the kernel does not take (launch_for says
    which do)."""
    launch = launch_for(rows, qweight, smooth, smooth_rows, group_size, tile)
    if launch is None:
        raise not_taken(rows, qweight, group_size)
    return run_launch(launch, rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)


def nvfp4_step(k: int) -> int:
    """NVFP4's columns a step (the kernel's GROUP): 128, a thread's 32 columns (two scale blocks) a row; 64 where K is
    not a multiple of 128 (nvfp4.triton_takes: of 64)."""
    return 128 if k % 128 == 0 else 64


def nvfp4_mma(rows, weight, scales, global_scale, smooth, smooth_rows, bias, **tile) -> torch.Tensor:
    """nvfp4_linear's y [M, N] for rows [M, K], M <= 16, as int4_mma; raises ValueError for a call it does not take."""
    launch = launch_for(rows, weight, smooth, smooth_rows, None, tile)
    if launch is None:
        raise not_taken(rows, weight, 16)
    return run_launch(launch, rows, weight, scales, global_scale, smooth, smooth_rows, bias, None)


def not_taken(rows: torch.Tensor, qweight: torch.Tensor, group_size: int) -> ValueError:
    return ValueError(f"the int4 MMA kernel does not take x {list(rows.shape)} {rows.dtype} on {rows.device} with "
                      f"codes {list(qweight.shape)} in groups of {group_size}")  # fmt: skip


def run_launch(launch: dict, rows, qweight, scales, zeros, smooth, smooth_rows, bias,
               group_size: int | None) -> torch.Tensor:  # fmt: skip
    """int4_mma for a launch launch_for made; nvfp4_mma's (NVFP4's scales and global scales for scales and zeros) where
    `group_size` is None."""
    out = rows.new_empty(rows.shape[0], qweight.shape[0])
    runtime, constexprs = kernel_arguments(launch, rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size,
                                           out)  # fmt: skip
    mma_kernels().int4_mma_kernel[(triton_cdiv(qweight.shape[0], launch["ROWS"]),)](
        *runtime, **constexprs, num_warps=launch["SPLIT"], **pdl_launch_options(rows)
    )
    return out


def kernel_arguments(launch: dict, rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int | None,
                     out: torch.Tensor) -> tuple[tuple, dict]:  # fmt: skip
    """int4_mma_kernel's runtime arguments, in order, and its constexprs but USE_PDL (the launch's to set); NVFP4's
    where `group_size` is None (run_launch)."""
    m, n, k = rows.shape[0], qweight.shape[0], 2 * qweight.shape[1]
    e2m1 = group_size is None
    runtime = (rows, qweight, scales.view(torch.uint8) if e2m1 else scales, zeros, smooth if smooth is not None else rows,
               bias if bias is not None else rows, out, m, n, rows.stride(0), qweight.stride(0), scales.stride(0),
               *part_ends(n, smooth_rows))  # fmt: skip
    constexprs = {"K": k, "GROUP": nvfp4_step(k) if e2m1 else group_size, "HAS_SMOOTH": smooth is not None,
                  "HAS_BIAS": bias is not None, "OFFSET": not e2m1 and zeros.is_floating_point(), "E2M1": e2m1,
                  **launch}  # fmt: skip
    return runtime, constexprs
