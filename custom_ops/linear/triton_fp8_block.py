"""The Triton kernel of `compiled_llm::fp8_block_linear`'s `triton` backend, in the op's numerics (fp8_block.py).

A GEMM tiled BLOCK_M x BLOCK_N (BLOCK_N divides 128, so a tile's rows share one weight scale per group) that walks
K one 128-column group at a time: it loads x's group, finds each row's amax and rounds it to e4m3 (the group is
the whole quantization unit, so no pass over x comes first), multiplies on the FP8 tensor cores into a float32
partial, and adds partial * s_x * s_w to a float32 accumulator, the order the reference takes. One kernel a linear.

`swapped=True` (opt-in until its GPU test has run): decode rows (up to 16) take the same loop with the operands
swapped, as triton_decode_gemm.decode_gemm does: the weight tile is the MMA's wide operand (Hopper's wgmma wants 64
rows) and x's rows, padded to 16, the narrow one.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import pdl_launch_options

GROUP = 128  # fp8_block.BLOCK


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_block_gemm_kernel(
        x_ptr, w_ptr, w_scale_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_wsn, stride_ym,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask, n_mask = rows < M, cols_n < N
        group = tl.arange(0, 128)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + group[None, :]
        w_ptrs = w_ptr + cols_n[:, None].to(tl.int64) * stride_wn + group[None, :]
        w_scales = w_scale_ptr + (tl.program_id(1) * BLOCK_N // 128) * stride_wsn  # this tile's row of block scales
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(tl.cdiv(K, 128)):
            k_mask = (g * 128 + group) < K
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x_scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) * (1.0 / 448.0)
            inverse = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), x_scale)
            x8 = tl.clamp(x * inverse[:, None], -448.0, 448.0).to(tl.float8e4nv)
            partial = tl.dot(x8, tl.trans(w))
            acc += partial * x_scale[:, None] * tl.load(w_scales + g)
            x_ptrs += 128
            w_ptrs += 128
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols_n[None, :]  # M x N may pass 2^31
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def fp8_block_decode_kernel(
        x_ptr, w_ptr, w_scale_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_wsn, stride_ym,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        M_PADDED: tl.constexpr = 16  # the MMA's narrowest side
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cols_n < N
        ms = tl.arange(0, M_PADDED)
        m_mask = ms < M
        group = tl.arange(0, 128)
        x_ptrs = x_ptr + ms[None, :] * stride_xm + group[:, None]  # x^T: [128, M_PADDED]
        w_ptrs = w_ptr + cols_n[:, None].to(tl.int64) * stride_wn + group[None, :]
        w_scales = w_scale_ptr + (tl.program_id(0) * BLOCK_N // 128) * stride_wsn
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([BLOCK_N, M_PADDED], dtype=tl.float32)
        for g in range(tl.cdiv(K, 128)):
            k_mask = (g * 128 + group) < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
            x_scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * (1.0 / 448.0)
            inverse = tl.math.div_rn(tl.full([M_PADDED], 1.0, tl.float32), x_scale)
            x8 = tl.clamp(x * inverse[None, :], -448.0, 448.0).to(tl.float8e4nv)
            partial = tl.dot(w, x8)
            acc += partial * x_scale[None, :] * tl.load(w_scales + g)
            x_ptrs += 128
            w_ptrs += 128
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + ms[None, :] * stride_ym + cols_n[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])

    return fp8_block_gemm_kernel, fp8_block_decode_kernel


DECODE_ROWS = 16  # rows the swapped decode kernel serves
# As the 8-bit decode GEMM's measured tile (triton_decode_gemm.py: 64 weight rows, 4 warps), with one 128-column group
# a step; the stage count a first guess until measured (benchmarks/fp8_linear_bench.py --decode).
DECODE_TILE = {"BLOCK_N": 64, "num_stages": 6, "num_warps": 4}


ROW_BUCKETS = (16, 32, 64)  # decode row counts the autotuner tunes (fp8_block_tuning.py): a call takes the next
# Tiles the autotuner chose, by (device index, n, k, row bucket): {"swapped": bool, **tile} (fp8_block_tuning.py).
TUNED_BLOCK_TILES: dict[tuple[int, int, int, int], dict] = {}


def tuned_tile(device_index: int, n: int, k: int, m: int) -> dict | None:
    """The tuned {"swapped": ..., **tile} for a call of m rows, or None (the heuristic runs)."""
    bucket = next((rows for rows in ROW_BUCKETS if m <= rows), None)
    return TUNED_BLOCK_TILES.get((device_index, n, k, bucket)) if bucket is not None else None


def fp8_block_gemm_config(m: int) -> dict:
    """Tile by row count: 16 rows (tl.dot's least) for decode batches where the swapped kernel is not asked for,
    64 and 128 for prefill chunks. A first guess, to be replaced by measurements (autotune/)."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}


def fp8_block_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   swapped: bool = False, **config) -> torch.Tensor:  # fmt: skip
    """x [M, K] (unit last stride) against e4m3 weight [N, K] (contiguous) with block scales [ceil(N/128),
    ceil(K/128)] -> [M, N] in x's dtype; the caller checked the shapes (fp8_block.py). `swapped`: up to DECODE_ROWS
    rows, the swapped decode kernel (not the default until it has passed its GPU test; the autotuner may choose it
    for a shape after checking it there). With neither, the tuned choice for the shape (TUNED_BLOCK_TILES), if any.
    `config` overrides the tile:
    BLOCK_N (a power of two from 16 dividing 128), num_warps, and num_stages (swapped) or BLOCK_M."""
    import triton

    m, k = x.shape
    n = weight.shape[0]
    if not swapped and not config:
        tuned = tuned_tile(x.get_device(), n, k, m)
        if tuned is not None:
            config = dict(tuned)
            swapped = config.pop("swapped")
    out = x.new_empty(m, n)
    args = (x, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, x.stride(0),
            weight.stride(0), weight_scale.stride(0), out.stride(0))  # fmt: skip
    if swapped and m <= DECODE_ROWS:
        config = DECODE_TILE | config
        _kernels()[1][(triton.cdiv(n, config["BLOCK_N"]),)](
            *args, K=k, HAS_BIAS=bias is not None, **config, **pdl_launch_options(x)
        )  # fmt: skip
        return out
    config = fp8_block_gemm_config(m) | config
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    _kernels()[0][grid](*args, K=k, HAS_BIAS=bias is not None, **config)
    return out
