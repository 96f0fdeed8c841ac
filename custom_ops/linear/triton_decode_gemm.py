"""The decode GEMM: y [M, N] = x [M, K] . W [N, K]^T for decode rows (1 to 64) on the tensor cores.

With a few rows a linear is a stream over its weight; the product is taken as y^T [N, M] = W [N, K] . x^T [K, M],
so the weight fills the MMA's wide side in 64-row tiles (Hopper's wgmma) and x's rows, padded to 16, 32 or 64, its
narrow one, and the K loop is software-pipelined like any Triton GEMM (`SPLIT_K` shares K out among programs).
Its operands are either

- 8-bit with float32 row and channel scales (W8A8: `compiled_llm::fp8_linear`'s and `int8_linear`'s `triton`
  backends, in fp8.py's and int8.py's numerics; triton_w8a8.py quantizes the rows). On an H200 it matches cuBLASLt's
  FP8 GEMM with one scale per operand (which cannot take row scales) and is 1.5-2.4x faster than cuBLASLt with row
  scales (BENCHMARKS.md); or
- 16-bit (bfloat16 or float16, no scales): `compiled_llm::linear`'s `triton` backend at 2 to 64 rows where the
  autotuner measured it beating cuBLAS (op.py), and `linear_silu_mul`'s with the gated activation in its epilogue
  (`silu_mul`: one kernel and no [M, 2N] intermediate, where cuBLAS needs a second kernel).

Sums are float32 (int32 for int8, exact); the 8-bit epilogue computes sum * s_x * s_w, then + bias, each rounded, as
the references do.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import pdl_launch_options

# Triton's default contracts a product and the bias add into one FMA (one rounding fewer), which moves a float32
# result by an ulp and, now and then, the rounded output by a step: off, so the 8-bit epilogue rounds as the
# references do. The sums themselves are the tensor cores' or exact.
NO_FMA = {"enable_fp_fusion": False}

# Rows the decode GEMM takes (x padded to 16, 32 or 64 for the MMA): on an H200 from 1 to 64 rows an FP8 call takes
# about the same time, 1.2-2.4x less than cuBLASLt's GEMM with row scales (benchmarks/fp8_linear_bench.py --decode).
MAX_ROWS = 64

# 8-bit: on an H200 the best of 14 tiles (16-128 rows x 128-512 columns, 3 or 5 stages) for every Llama-3.1-8B
# linear at 1 to 64 rows, or within 10% of it (benchmarks/fp8_linear_bench.py --decode, BENCHMARKS.md). Neither L2
# prefetches before the PDL wait nor a split K made a step faster there: both stay off unless asked for.
DECODE_TILE = {"BLOCK_N": 64, "BLOCK_K": 256, "num_stages": 5, "num_warps": 4, "PREFETCH": 0, "SPLIT_K": 1}
# 16-bit: the same 64 weight rows with the 8-bit tile's bytes a stage (128 columns of 2 bytes), 4 stages: 64 rows of
# x and the weight take 32 KiB a stage, within Hopper's 227 KiB of shared memory at every row count.
DECODE_TILE_16BIT = DECODE_TILE | {"BLOCK_K": 128, "num_stages": 4}

# 8-bit tiles the autotuner chose for this process (autotune.select_kernels; decode_gemm_tuning.py), by
# tuned_tile_key; a shape without one takes DECODE_TILE.
TUNED_TILES: dict[tuple, dict] = {}


def operands_name(x: torch.Tensor) -> str:
    """The operands part of a tuned tile's key: "fp8" or "int8"."""
    return "int8" if x.dtype == torch.int8 else "fp8"


def tuned_tile_key(device_index: int, n: int, k: int, padded_rows: int, operands: str) -> tuple:
    """(device index as Tensor.get_device gives it, N, K, M_PADDED, operands_name)."""
    return (device_index, n, k, padded_rows, operands)


def m_padded(rows: int) -> int:
    """What x's rows are padded to for the MMA: 16, 32 or 64."""
    return max(16, 1 << (rows - 1).bit_length())


def default_tile(dtype: torch.dtype) -> dict:
    return DECODE_TILE if dtype.itemsize == 1 else DECODE_TILE_16BIT


@functools.cache
def _kernel():
    from custom_ops.linear.triton_decode_gemm_kernels import decode_gemm_kernel

    return decode_gemm_kernel


def decode_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                x_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None, silu_mul: bool = False,
                **tile) -> torch.Tensor:  # fmt: skip
    """x [M <= MAX_ROWS, K] (unit last stride) against a weight [N, K] of its dtype (contiguous) -> [M, N] in
    `out_dtype`; the caller checked the shapes (fp8.triton_takes, int8.triton_takes, op._decode_gemm_tile).
    8-bit operands (e4m3 or int8) take float32 row scales x_scale [M, 1] and channel scales weight_scale [N], both
    contiguous; 16-bit ones none. `silu_mul` (16-bit): the weight is [gate; up] and the result silu(gate) * up,
    [M, N / 2]. `tile` overrides the tuned tile's entries (TUNED_TILES), which override the default tile's."""
    import triton

    m, k = x.shape
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"decode_gemm takes 1 to {MAX_ROWS} rows, got {m}")
    scaled = x.dtype.itemsize == 1
    if scaled != (x_scale is not None and weight_scale is not None):
        raise ValueError(f"decode_gemm: {x.dtype} operands take {'both' if scaled else 'no'} scales")
    default = default_tile(x.dtype)
    if unknown := set(tile) - set(default):
        raise ValueError(f"decode_gemm: unknown tile entries {sorted(unknown)}; it takes {sorted(default)}")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    padded = m_padded(m)
    # 16-bit calls come with their tile (op.TUNED_ROWS holds the 16-bit choices): only 8-bit ones look theirs up here
    tuned = TUNED_TILES.get(tuned_tile_key(x.get_device(), n, k, padded, operands_name(x)), {}) if scaled else {}
    tile = default | tuned | tile
    block_n, block_k = tile["BLOCK_N"], tile["BLOCK_K"]
    if tile["PREFETCH"] and block_k * x.dtype.itemsize % 128:
        raise ValueError(f"decode_gemm: PREFETCH takes BLOCK_K in whole 128-byte lines of the weight, got {tile}")
    tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split = tile["SPLIT_K"]
    if not (isinstance(split, int) and split >= 1):
        raise ValueError(f"decode_gemm: SPLIT_K takes an integer >= 1, got {split!r}")
    if silu_mul and (scaled or split > 1):
        raise ValueError("decode_gemm: silu_mul takes 16-bit operands without a split of K")
    out = x.new_empty(m, n, dtype=out_dtype)
    k_tiles_a_split = triton.cdiv(k_tiles, min(split, k_tiles))
    split = triton.cdiv(k_tiles, k_tiles_a_split)  # no program without a K tile
    partial = counts = out  # unused without a split
    if split > 1:
        sums = torch.int32 if x.dtype == torch.int8 else torch.float32
        partial = torch.empty(split, m, n, device=x.device, dtype=sums)
        # Zeroed by every call, inside a CUDA graph too: no count outlives its call, whichever stream or graph.
        counts = torch.zeros(tiles, device=x.device, dtype=torch.int32)
    unused = weight  # a pointer for the arguments a launch does not read
    _kernel()[(tiles, split)](
        x, x_scale if scaled else unused, weight, weight[n:] if silu_mul else weight, weight_scale if scaled else unused,
        bias if bias is not None else unused, out, partial, counts, m, n, x.stride(0), weight.stride(0), out.stride(0),
        K=k, M_PADDED=padded, HAS_BIAS=bias is not None, EVEN_K=k % (block_k * k_tiles_a_split) == 0, SPLIT_K=split,
        K_SPLIT=k_tiles_a_split * block_k, BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=tile["PREFETCH"],
        num_stages=tile["num_stages"], num_warps=tile["num_warps"], INT8=x.dtype == torch.int8, SCALED=scaled,
        SILU_MUL=silu_mul, **NO_FMA, **pdl_launch_options(x),
    )  # fmt: skip
    return out
