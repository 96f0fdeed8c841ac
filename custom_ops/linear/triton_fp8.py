"""Triton kernels of `compiled_llm::fp8_linear`'s `triton` backend, in the op's numerics (fp8.py):

- `quantize_rows`: x [M, K] -> (e4m3 x8 [M, K], float32 s_x [M, 1]) in one kernel, one program per row (amax,
  scale, rounding; eager torch takes six kernels), before either GEMM below;
- `fp8_decode_gemm`: y [M, N] = (x8 . W8) s_x s_w for decode rows (1 to 64) on the FP8 tensor cores. With a few
  rows a linear is a stream over its weight; the product is taken as y^T [N, M] = W8 [N, K] . x8^T [K, M], so the
  weight fills the MMA's wide side in 64-row tiles (Hopper's wgmma) and x's rows, padded to 16, 32 or 64, its
  narrow one, and the K loop is software-pipelined like any Triton GEMM (`SPLIT_K` shares K out among programs).
  On an H200 it matches cuBLASLt's FP8 GEMM with one scale per operand (which cannot take row scales) and is
  1.5-2.4x faster than cuBLASLt with row scales; with the
  quantizing kernel before it, a layer's linears take ~70 us against ~91 for the CUDA-core GEMV it replaced (even on
  the small ones, 1.3-1.7x on gate/up and down; BENCHMARKS.md); more rows go to `torch._scaled_mm`.

Scales and roundings are computed as fp8.scale_and_round defines them (products and one IEEE reciprocal, `div_rn`),
so each e4m3 value equals the reference's; products of two e4m3 values are exact in float32 and summed in float32,
which leaves the summation order as the only difference.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import pdl_launch_options

# Rows the op sends to fp8_decode_gemm (x padded to 16, 32 or 64 for the MMA): on an H200 from 1 to 64 rows it takes
# about the same time, 1.2-2.4x less than cuBLASLt's GEMM with row scales (benchmarks/fp8_linear_bench.py --decode).
MAX_ROWS = 64
# The kernels write fp8.FP8_MAX (448) and fp8.MIN_AMAX (1e-12) as literals: a jitted function reads no globals.


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(
        x_ptr, input_scale_ptr, q_ptr, s_ptr, stride_x, stride_q,
        K: tl.constexpr, BLOCK: tl.constexpr, STATIC: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(input_scale_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * (1.0 / 448.0)
        q = tl.clamp(x * tl.math.div_rn(1.0, scale), -448.0, 448.0).to(tl.float8e4nv)
        tl.store(q_ptr + row * stride_q + cols, q, mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def fp8_decode_gemm_kernel(
        x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, b_ptr, y_ptr, partial_ptr, count_ptr, M, N, stride_xm, stride_wn,
        stride_ym, K: tl.constexpr, M_PADDED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, SPLIT_K: tl.constexpr,
        K_SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tile = tl.program_id(0)
        k_start = tl.program_id(1) * K_SPLIT  # this program's share of K (all of it without a split)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        # PREFETCH tiles of this program's weights into L2 (one instruction per 128-byte line) before the PDL wait:
        # the weights are no kernel's output, so their first bytes can arrive while the previous kernel drains.
        if PREFETCH > 0:  # BLOCK_K a multiple of 128 then
            lines = tl.arange(0, BLOCK_K // 128) * 128
        for i in tl.static_range(PREFETCH):
            line_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + k_start + i * BLOCK_K + lines[None, :]
            in_bounds = (rows[:, None] < N) & (k_start + i * BLOCK_K + lines[None, :] < K)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [line_ptrs, in_bounds.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
        row_mask = rows < N
        ms = tl.arange(0, M_PADDED)
        m_mask = ms < M
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + k_start + ks[None, :]
        x_ptrs = x_ptr + ms[None, :] * stride_xm + k_start + ks[:, None]  # x8^T: [BLOCK_K, M_PADDED]
        w_scale = tl.load(w_scale_ptr + rows, mask=row_mask, other=0.0)  # a parameter: before the wait
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([BLOCK_N, M_PADDED], dtype=tl.float32)
        for k in range(0, K_SPLIT, BLOCK_K):
            k_mask = (ks < K - k_start - k) | EVEN_K  # EVEN_K: no mask, so the loads stay 16-byte vectors
            w = tl.load(w_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
            acc = tl.dot(w, x, acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out_mask = row_mask[:, None] & m_mask[None, :]
        if SPLIT_K > 1:
            # Split K: each program leaves its float32 sums in partial [SPLIT_K, M, N] and counts itself in for its
            # tile (counts zeroed by the call); the last to arrive adds the SPLIT_K sums in split order
            # (deterministic) and writes y. Barrier, then one thread's release (the atomic), as CUDA's grid sync
            # does: every thread's partial is visible GPU-wide before the count says so.
            partial_ptrs = partial_ptr + ms[None, :] * N + rows[:, None]
            tl.store(partial_ptrs + tl.program_id(1) * M * N, acc, mask=out_mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            last = arrived == SPLIT_K - 1
            if last:
                acc = tl.zeros([BLOCK_N, M_PADDED], dtype=tl.float32)
                for split in tl.static_range(SPLIT_K):  # from L2: other SMs wrote them
                    acc += tl.load(partial_ptrs + split * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            out_mask = out_mask & last
        x_scale = tl.load(x_scale_ptr + ms, mask=m_mask, other=0.0)
        out = acc * w_scale[:, None] * x_scale[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + ms[None, :] * stride_ym + rows[:, None]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)

    return quantize_rows_kernel, fp8_decode_gemm_kernel


def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.quantize_rows in one kernel: x [M, K] with unit last stride -> (x8 [M, K], s_x [M, 1])."""
    import triton

    m, k = x.shape
    quantized = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _kernels()[0][(m,)](
        x, input_scale if input_scale is not None else scale, quantized, scale, x.stride(0), quantized.stride(0),
        K=k, BLOCK=block, STATIC=input_scale is not None, num_warps=min(16, max(4, block // 1024)),
        **pdl_launch_options(x),
    )  # fmt: skip
    return quantized, scale


# On an H200 the best of 14 tiles (16-128 rows x 128-512 columns, 3 or 5 stages) for every Llama-3.1-8B linear at
# 1 to 64 rows, or within 10% of it (benchmarks/fp8_linear_bench.py --decode, BENCHMARKS.md). Neither L2 prefetches
# before the PDL wait nor a split K made a step faster there: both stay off unless asked for.
DECODE_TILE = {"BLOCK_N": 64, "BLOCK_K": 256, "num_stages": 5, "num_warps": 4, "PREFETCH": 0, "SPLIT_K": 1}


# Tiles the autotuner chose for this process (autotune.select_kernels; fp8_tuning.py), by (device index as
# Tensor.get_device gives it, N, K, M_PADDED); a shape without one takes DECODE_TILE.
TUNED_TILES: dict[tuple[int, int, int, int], dict] = {}


def m_padded(rows: int) -> int:
    """What x's rows are padded to for the MMA: 16, 32 or 64."""
    return max(16, 1 << (rows - 1).bit_length())


def fp8_decode_gemm(x8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, **tile) -> torch.Tensor:  # fmt: skip
    """x8 [M <= MAX_ROWS, K] e4m3 (unit last stride) with float32 row scales x_scale [M, 1] (contiguous) against an
    e4m3 weight [N, K] (contiguous) with float32 scales [N] -> [M, N] in `out_dtype`; the caller checked the shapes
    (fp8.triton_takes). `tile` overrides the tuned tile's entries (TUNED_TILES), which override DECODE_TILE's."""
    import triton

    m, k = x8.shape
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"fp8_decode_gemm takes 1 to {MAX_ROWS} rows, got {m}")
    n = weight.shape[0]
    out = x8.new_empty(m, n, dtype=out_dtype)
    if unknown := set(tile) - set(DECODE_TILE):
        raise ValueError(f"fp8_decode_gemm: unknown tile entries {sorted(unknown)}; it takes {sorted(DECODE_TILE)}")
    padded = m_padded(m)
    tile = DECODE_TILE | TUNED_TILES.get((x8.get_device(), n, k, padded), {}) | tile
    block_n, block_k = tile["BLOCK_N"], tile["BLOCK_K"]
    if tile["PREFETCH"] and block_k % 128:
        raise ValueError(f"fp8_decode_gemm: PREFETCH takes BLOCK_K in multiples of 128 (a line a prefetch), got {tile}")
    tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split = tile["SPLIT_K"]
    if not (isinstance(split, int) and split >= 1):
        raise ValueError(f"fp8_decode_gemm: SPLIT_K takes an integer >= 1, got {split!r}")
    k_tiles_a_split = triton.cdiv(k_tiles, min(split, k_tiles))
    split = triton.cdiv(k_tiles, k_tiles_a_split)  # no program without a K tile
    partial = counts = out  # unused without a split
    if split > 1:
        partial = torch.empty(split, m, n, device=x8.device, dtype=torch.float32)
        # Zeroed by every call, inside a CUDA graph too: no count outlives its call, whichever stream or graph.
        counts = torch.zeros(tiles, device=x8.device, dtype=torch.int32)
    _kernels()[1][(tiles, split)](
        x8, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out, partial, counts, m, n,
        x8.stride(0), weight.stride(0), out.stride(0), K=k, M_PADDED=padded,
        HAS_BIAS=bias is not None, EVEN_K=k % (block_k * k_tiles_a_split) == 0, SPLIT_K=split,
        K_SPLIT=k_tiles_a_split * block_k, BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=tile["PREFETCH"],
        num_stages=tile["num_stages"], num_warps=tile["num_warps"], **pdl_launch_options(x8),
    )  # fmt: skip
    return out
