"""Triton kernels of 8-bit weights and activations (W8A8): `compiled_llm::fp8_linear`'s `triton` backend, in its
numerics (fp8.py), and `compiled_llm::int8_linear`'s (int8.py; SmoothQuant's smooth, int8 codes, int32 sums):

- `quantize_rows`: x [M, K] (times a smooth) -> (e4m3 or int8 x8 [M, K], float32 s_x [M, 1]) in one kernel, one
  program per row (amax, scale, rounding; eager torch takes six kernels or more), before either GEMM below;
- `w8a8_decode_gemm`: y [M, N] = (x8 . W8) s_x s_w for decode rows (1 to 64) on the tensor cores. With a few
  rows a linear is a stream over its weight; the product is taken as y^T [N, M] = W8 [N, K] . x8^T [K, M], so the
  weight fills the MMA's wide side in 64-row tiles (Hopper's wgmma) and x's rows, padded to 16, 32 or 64, its
  narrow one, and the K loop is software-pipelined like any Triton GEMM (`SPLIT_K` shares K out among programs).
  On an H200 it matches cuBLASLt's FP8 GEMM with one scale per operand (which cannot take row scales) and is
  1.5-2.4x faster than cuBLASLt with row scales; with the
  quantizing kernel before it, a layer's linears take ~70 us against ~91 for the CUDA-core GEMV it replaced (even on
  the small ones, 1.3-1.7x on gate/up and down; BENCHMARKS.md); more rows go to `torch._scaled_mm` (FP8) or to
  `torch._int_mm` and `scale_sums` (int8).

Scales and roundings are computed as fp8.scale_and_round and int8.round_to_int8 define them (products and one IEEE
reciprocal, `div_rn`; int8 rounds half to even, as torch.round), so each 8-bit value equals the reference's. Products
of two e4m3 values are exact in float32 and summed in float32, which leaves the summation order as the only
difference; int8 products are summed exactly in int32 (|x8 W8| <= 127^2, K < 2^17) and rounded once to float32.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import pdl_launch_options

# The epilogues compute sum * s_x * s_w, then + bias, each rounded, as the references do; Triton's default contracts
# the product and the bias add into one FMA (one rounding fewer), which moves a float32 result by an ulp and, now and
# then, the rounded output by a step. Off at those launches: the sums themselves are the tensor cores' or exact.
_NO_FMA = {"enable_fp_fusion": False}

# Rows the op sends to w8a8_decode_gemm (x padded to 16, 32 or 64 for the MMA): on an H200 from 1 to 64 rows it takes
# about the same time, 1.2-2.4x less than cuBLASLt's GEMM with row scales (benchmarks/fp8_linear_bench.py --decode).
MAX_ROWS = 64


@functools.cache
def _kernels():
    from custom_ops.linear import triton_w8a8_kernels

    return (triton_w8a8_kernels.quantize_rows_kernel, triton_w8a8_kernels.w8a8_decode_gemm_kernel,
            triton_w8a8_kernels.scale_sums_kernel)  # fmt: skip


def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None, smooth: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """fp8.quantize_rows (`dtype` e4m3) or int8.quantize_rows (int8, with a contiguous float32 `smooth` [K] or
    None) in one kernel: x [M, K] with unit last stride -> (x8 [M, K], s_x [M, 1])."""
    import triton

    m, k = x.shape
    quantized = torch.empty(m, k, device=x.device, dtype=dtype)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _kernels()[0][(m,)](
        x, input_scale if input_scale is not None else scale, smooth if smooth is not None else scale, quantized,
        scale, x.stride(0), quantized.stride(0), K=k, BLOCK=block, STATIC=input_scale is not None,
        HAS_SMOOTH=smooth is not None, INT8=dtype == torch.int8, num_warps=min(16, max(4, block // 1024)),
        **pdl_launch_options(x),
    )  # fmt: skip
    return quantized, scale


# On an H200 the best of 14 tiles (16-128 rows x 128-512 columns, 3 or 5 stages) for every Llama-3.1-8B linear at
# 1 to 64 rows, or within 10% of it (benchmarks/fp8_linear_bench.py --decode, BENCHMARKS.md). Neither L2 prefetches
# before the PDL wait nor a split K made a step faster there: both stay off unless asked for.
DECODE_TILE = {"BLOCK_N": 64, "BLOCK_K": 256, "num_stages": 5, "num_warps": 4, "PREFETCH": 0, "SPLIT_K": 1}


# Tiles the autotuner chose for this process (autotune.select_kernels; w8a8_tuning.py), by tuned_tile_key; a shape
# without one takes DECODE_TILE.
TUNED_TILES: dict[tuple, dict] = {}


def tuned_tile_key(device_index: int, n: int, k: int, padded_rows: int, int8: bool) -> tuple:
    """(device index as Tensor.get_device gives it, N, K, M_PADDED), and "int8" last for int8 operands."""
    return (device_index, n, k, padded_rows, *(("int8",) if int8 else ()))


def m_padded(rows: int) -> int:
    """What x's rows are padded to for the MMA: 16, 32 or 64."""
    return max(16, 1 << (rows - 1).bit_length())


def w8a8_decode_gemm(x8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, **tile) -> torch.Tensor:  # fmt: skip
    """x8 [M <= MAX_ROWS, K] e4m3 or int8 (unit last stride) with float32 row scales x_scale [M, 1] (contiguous)
    against a weight [N, K] of the same dtype (contiguous) with float32 scales [N] -> [M, N] in `out_dtype`; the caller
    checked the shapes (fp8.triton_takes, int8.triton_takes). `tile` overrides the tuned tile's entries (TUNED_TILES),
    which override DECODE_TILE's."""
    import triton

    m, k = x8.shape
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"w8a8_decode_gemm takes 1 to {MAX_ROWS} rows, got {m}")
    n = weight.shape[0]
    out = x8.new_empty(m, n, dtype=out_dtype)
    if unknown := set(tile) - set(DECODE_TILE):
        raise ValueError(f"w8a8_decode_gemm: unknown tile entries {sorted(unknown)}; it takes {sorted(DECODE_TILE)}")
    padded, int8 = m_padded(m), x8.dtype == torch.int8
    tile = DECODE_TILE | TUNED_TILES.get(tuned_tile_key(x8.get_device(), n, k, padded, int8), {}) | tile
    block_n, block_k = tile["BLOCK_N"], tile["BLOCK_K"]
    if tile["PREFETCH"] and block_k % 128:
        raise ValueError(
            f"w8a8_decode_gemm: PREFETCH takes BLOCK_K in multiples of 128 (a line a prefetch), got {tile}"
        )
    tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split = tile["SPLIT_K"]
    if not (isinstance(split, int) and split >= 1):
        raise ValueError(f"w8a8_decode_gemm: SPLIT_K takes an integer >= 1, got {split!r}")
    k_tiles_a_split = triton.cdiv(k_tiles, min(split, k_tiles))
    split = triton.cdiv(k_tiles, k_tiles_a_split)  # no program without a K tile
    partial = counts = out  # unused without a split
    if split > 1:
        partial = torch.empty(split, m, n, device=x8.device, dtype=torch.int32 if int8 else torch.float32)
        # Zeroed by every call, inside a CUDA graph too: no count outlives its call, whichever stream or graph.
        counts = torch.zeros(tiles, device=x8.device, dtype=torch.int32)
    _kernels()[1][(tiles, split)](
        x8, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out, partial, counts, m, n,
        x8.stride(0), weight.stride(0), out.stride(0), K=k, M_PADDED=padded,
        HAS_BIAS=bias is not None, EVEN_K=k % (block_k * k_tiles_a_split) == 0, SPLIT_K=split,
        K_SPLIT=k_tiles_a_split * block_k, BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=tile["PREFETCH"],
        num_stages=tile["num_stages"], num_warps=tile["num_warps"], INT8=int8, **_NO_FMA, **pdl_launch_options(x8),
    )  # fmt: skip
    return out


def scale_sums(sums: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """int8 sums [M, N] (torch._int_mm's, unit last stride) * x_scale [M, 1] * weight_scale [N] (+ bias [N]), both
    scales contiguous float32, in `out_dtype`, in one kernel: int8.py's epilogue in the reference's order."""
    import triton

    m, n = sums.shape
    out = sums.new_empty(m, n, dtype=out_dtype)
    block_m, block_n = 32, 128
    _kernels()[2][(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        sums, x_scale, weight_scale, bias if bias is not None else weight_scale, out, m, n, sums.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **_NO_FMA,
        **pdl_launch_options(sums),
    )  # fmt: skip
    return out
