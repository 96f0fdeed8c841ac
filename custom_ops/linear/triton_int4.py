"""Triton kernels of `compiled_llm::int4_linear`'s `triton` backend, in the op's numerics (int4.py):

- `int4_gemv`: one row (a batch-1 decode step), on CUDA cores. Each program owns BLOCK_N output channels and streams
  their codes as 32-bit words (8 columns each). Two codes of a word become two float16 values 1024 + q at once (a
  shift and a mask-or: the magic-number trick of TensorRT-LLM's and Marlin's dequantization), the group's 1024 + z
  is subtracted in float16 (exact: small integers), and the products with x are summed in float32 per group, then
  scaled once a group. About 3 instructions a weight beside the load, against ~1 of a bf16 GEMV, which reads 4x the
  bytes.
- `int4_gemm`: more rows, on tensor cores: a tile of codes unpacked in registers, q - z (exact in bf16 or fp16)
  dotted with x's tile, and the group's scale applied to the float32 partial sum, so only x is rounded.

The kernels are in triton_int4_kernels.py (imported on first use: this module, the launches and the autotuner's
tables, needs no triton); int4_tuning.py makes their launches autotuner candidates. Up to 16 rows of bfloat16 or
float16 go to gluon_int4.py's tensor-core decode instead (mma_default's launch, or a tuned one with "MMA"), unless the
tuner chose a launch of these kernels.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import pdl_launch_options, runs_ptx


@functools.cache
def four_bit_kernels():
    from custom_ops.linear import triton_int4_kernels

    return triton_int4_kernels


# The autotuner's choices in this process (int4_tuning.py), by (device index as Tensor.get_device gives it, N, K, group
# size, offsets or zero points) for the GEMV and (..., rows bucket) for the GEMM: launch overrides of gemv_config's /
# gemm_config's, each validated in its own form of zeros.
TUNED_GEMV: dict[tuple[int, int, int, int, bool], dict] = {}
TUNED_GEMM: dict[tuple[int, int, int, int, bool, int], dict] = {}
GEMM_ROW_BUCKETS = (16, 64)  # decode batches; more rows run gemm_config's prefill tile


def gemv_config(n: int, k: int, group_size: int, ptx: bool = False) -> dict:
    """The GEMV's launch for weight [n, k]: 16 channels a program, and 1024 columns (512 bytes a row) a step over 8
    warps, which keeps enough bytes in flight on a linear of a few thousand channels; a wide one (gate/up) has the
    programs for that, and is bound by the decode's instructions, not its loads: 256 columns a step over 4 warps.
    Measured on an H200 over Llama-8B's shapes (BENCHMARKS.md: 19.1 -> 12.5 us for q/k/v, 46.9 -> 22.3 for down).
    Groups under 64 columns (GGUF's 32, which the tensor-core decode leaves to this kernel at one row) pay a scale and
    an offset every 32 columns, so the decode's instructions bound every shape: the codes decoded in PTX where it runs
    (`ptx`: on a GPU, not the interpreter), and a long or wide linear's loads pipelined 3 steps ahead. H200, Llama-8B
    Q4_K's tuned leaders, 105.7 us a layer: q/k/v 12.3, o 12.0, gate/up 47.4, down 34.0 (BENCHMARKS.md)."""
    columns = 256 if n >= 16384 else 1024
    groups = max(1, min(columns // group_size, k // group_size))
    launch = {
        "BLOCK_N": 16 if n >= 4096 else 8,
        "GROUPS_A_STEP": power_of_2_at_most(groups),
        "num_warps": 4 if n >= 16384 else 8,
    }
    if group_size < 64:
        launch["PTX_DECODE"] = ptx
        if k >= 8192 or n >= 16384:
            launch["STAGES"] = 3
    return launch


def takes_bf16_pairs(rows: torch.Tensor, smooth: torch.Tensor | None) -> bool:
    """Whether the GEMV may read x as 32-bit pairs of bfloat16 (BF16_PAIRS): bfloat16 rows at a 4-byte address, no
    smooth to multiply first."""
    return rows.dtype == torch.bfloat16 and rows.data_ptr() % 4 == 0 and smooth is None


def power_of_2_at_most(value: int) -> int:
    """The largest power of 2 <= value (>= 1): a kernel's tl.arange takes powers of 2 only."""
    return 1 << (max(1, value).bit_length() - 1)


def part_ends(n: int, smooth_rows: list[int]) -> tuple[int, int]:
    """part_end0, part_end1 of the kernels: where the first two parts of the channels end (n past the last)."""
    ends = [sum(smooth_rows[: i + 1]) for i in range(len(smooth_rows) - 1)]
    return (*ends, n, n)[:2]


def divides_parts(block_n: int, smooth_rows: list[int]) -> int:
    """block_n halved until it divides every part's channels (int4.triton_takes: each a multiple of 16)."""
    while any(rows % block_n for rows in smooth_rows):
        block_n //= 2
    return block_n


def int4_gemv(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int, **tile) -> torch.Tensor:
    """y [1, N] for rows [1, K] (int4.triton_takes checked what the kernel reads)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    tuned = TUNED_GEMV.get((rows.get_device(), n, k, group_size, zeros.is_floating_point()), {})
    out = tensor_core_decode(tile, tuned, rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)
    if out is not None:
        return out
    tuned, tile = triton_launch(tuned), triton_launch(tile)
    launch = {**gemv_config(n, k, group_size, runs_ptx(rows)), **tuned, **tile}
    if smooth is not None:
        launch["BLOCK_N"] = divides_parts(launch["BLOCK_N"], smooth_rows)
    if launch.get("BF16_PAIRS") and not takes_bf16_pairs(rows, smooth):
        launch["BF16_PAIRS"] = False
    out = rows.new_empty(1, n)
    four_bit_kernels().int4_gemv_kernel[(triton_cdiv(n, launch["BLOCK_N"]),)](
        rows, qweight, scales, zeros, smooth if smooth is not None else rows, bias if bias is not None else rows, out,
        n, qweight.stride(0), scales.stride(0), *part_ends(n, smooth_rows), K=k, GROUP=group_size,
        HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None, OFFSET=zeros.is_floating_point(), **launch, **pdl_launch_options(rows),
    )  # fmt: skip
    return out


def gemm_config(m: int, n: int, group_size: int) -> dict:
    """The tensor-core GEMM's tile for [m] rows: the MMA's narrow side (16) for decode batches, larger tiles for
    prefill."""
    block_k = min(group_size, 64)
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3}


def int4_gemm(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int, **tile) -> torch.Tensor:
    """y [M, N] for rows [M, K] on tensor cores (int4.triton_takes checked what the kernel reads)."""
    m, n, k = rows.shape[0], qweight.shape[0], 2 * qweight.shape[1]
    bucket = next((b for b in GEMM_ROW_BUCKETS if m <= b), None)
    key = (rows.get_device(), n, k, group_size, zeros.is_floating_point(), bucket)
    tuned = TUNED_GEMM.get(key, {}) if bucket else {}
    out = tensor_core_decode(tile, tuned, rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)
    if out is not None:
        return out
    tuned, tile = triton_launch(tuned), triton_launch(tile)
    launch = {**gemm_config(m, n, group_size), **tuned, **tile}
    if smooth is not None:
        launch["BLOCK_N"] = divides_parts(launch["BLOCK_N"], smooth_rows)
    if group_size % launch["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={launch['BLOCK_K']} does not divide the group of {group_size} columns")
    out = rows.new_empty(m, n)
    grid = (triton_cdiv(m, launch["BLOCK_M"]), triton_cdiv(n, launch["BLOCK_N"]))
    four_bit_kernels().int4_gemm_kernel[grid](
        rows, qweight, scales, zeros, smooth if smooth is not None else rows, bias if bias is not None else rows, out,
        m, n, rows.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), *part_ends(n, smooth_rows), K=k,
        GROUP=group_size, HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None, OFFSET=zeros.is_floating_point(), **launch,
        **pdl_launch_options(rows),
    )  # fmt: skip
    return out


def tensor_core_decode(tile: dict, tuned: dict, *args) -> torch.Tensor | None:
    """gluon_int4.tensor_core_decode (its module imported only here: it needs no triton, but is not needed on CPU)."""
    from custom_ops.linear import gluon_int4

    return gluon_int4.tensor_core_decode(tile, tuned, *args)


def triton_launch(tile: dict) -> dict:
    """A launch of the Triton kernels: a tensor-core decode's choice ({"MMA": True, ...}) is none of theirs, and
    {"MMA": False} is their own launch."""
    return {} if tile.get("MMA") else {key: value for key, value in tile.items() if key != "MMA"}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
