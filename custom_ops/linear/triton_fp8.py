"""Triton kernels of `compiled_llm::fp8_linear`'s `triton` backend, in the op's numerics (fp8.py):

- `quantize_rows`: x [M, K] -> (e4m3 x8 [M, K], float32 s_x [M, 1]) in one kernel, one program per row (amax,
  scale, rounding), for the many-row calls that go on to cuBLASLt's FP8 GEMM (eager torch takes six kernels);
- `fp8_gemv`: y [M, N] = (e4m3(x / s_x) . W8) s_x s_w for batch-1 decode (one row; up to 8 compute correctly): a
  stream over the FP8 weight, like the bf16 GEMV (triton_gemv.py), with x's scale and rounding computed in the kernel, so a
  linear stays one kernel. Every program reads all of x (a few KiB, from L2) to find its scale.

Scales and roundings are computed as fp8.scale_and_round defines them (products and one IEEE reciprocal, `div_rn`),
so each e4m3 value equals the reference's; products of two e4m3 values are exact in float32 and summed in float32,
which leaves the summation order as the only difference.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import pdl_launch_options

# Rows the GEMV serves (it computes up to 8 correctly): with 2 or more it is slower than the quantizing kernel and
# the FP8 GEMM (x's conversions and products grow with the rows; the bf16 GEMV's 8 rows cost the same as 1).
MAX_ROWS = 1
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
    def fp8_gemv_kernel(
        x_ptr, w_ptr, w_scale_ptr, input_scale_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym,
        K: tl.constexpr, M_PADDED: tl.constexpr, STATIC: tl.constexpr, PREQUANTIZED: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        ms = tl.arange(0, M_PADDED)
        x_mask_m = ms[:, None] < M
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
        x_rows = x_ptr + ms[:, None] * stride_xm
        # The weights are no kernel's output: the first block and the scales load before the wait.
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0,
                    eviction_policy="evict_first")  # fmt: skip
        w_scale = tl.load(w_scale_ptr + rows, mask=row_mask, other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        if PREQUANTIZED:  # x is e4m3 already (a fused producer's) and input_scale_ptr holds its row scales
            scale = tl.load(input_scale_ptr + ms, mask=ms < M, other=1.0)
        elif STATIC:
            scale = tl.zeros([M_PADDED], dtype=tl.float32) + tl.load(input_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros([M_PADDED], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                x = tl.load(x_rows + k + cols[None, :], mask=x_mask_m & ((k + cols) < K)[None, :], other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
        inverse = tl.math.div_rn(tl.full([M_PADDED], 1.0, tl.float32), scale)
        acc = tl.zeros([M_PADDED, BLOCK_N], dtype=tl.float32)
        for k in tl.static_range(0, K, BLOCK_K):  # K is a model constant: unrolled
            if k > 0:
                w = tl.load(w_rows + k + cols[None, :], mask=row_mask[:, None] & ((k + cols) < K)[None, :], other=0.0,
                            eviction_policy="evict_first")  # fmt: skip
            x = tl.load(x_rows + k + cols[None, :], mask=x_mask_m & ((k + cols) < K)[None, :], other=0.0)
            if PREQUANTIZED:
                x8 = x
            else:
                x8 = tl.clamp(x.to(tl.float32) * inverse[:, None], -448.0, 448.0).to(tl.float8e4nv)
            acc += tl.sum(x8.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        out = acc * scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + ms[:, None] * stride_ym + rows[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=x_mask_m & row_mask[None, :])

    return quantize_rows_kernel, fp8_gemv_kernel


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


def fp8_gemv_config(m: int, k: int, n: int) -> dict:
    """Tile for x [m, k] @ W8[n, k]^T: 8 weight rows a program, whole rows up to 4096 columns (4096 at a time
    beyond), 4 warps. On an H200, one row, each Llama-3.1-8B linear (benchmarks/fp8_linear_bench.py --search,
    BENCHMARKS.md) is within 10% of the best of a 16-tile grid with it; x's rounding, which every program
    repeats, is shared by more rows than the bf16 GEMV's 2."""
    import triton

    return {"BLOCK_N": 8, "BLOCK_K": min(triton.next_power_of_2(k), 4096), "num_warps": 4}


@functools.cache
def _tile(m: int, k: int, n: int) -> tuple:
    return tuple(fp8_gemv_config(m, k, n).items())


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
             bias: torch.Tensor | None, out_dtype: torch.dtype | None = None, **config) -> torch.Tensor:  # fmt: skip
    """x [M <= 8, K] (unit last stride) against e4m3 weight [N, K] (contiguous) with float32 scales [N] ->
    [M, N] in x's dtype; the caller checked the shapes (fp8.py). An e4m3 x is quantized already: `input_scale`
    holds its row scales [M, 1] and `out_dtype` is the output's. `config` overrides the tile (BLOCK_N, BLOCK_K,
    num_warps)."""
    import triton

    m, k = x.shape
    n = weight.shape[0]
    prequantized = x.dtype == torch.float8_e4m3fn
    out = x.new_empty(m, n, dtype=out_dtype if prequantized else x.dtype)
    config = dict(_tile(m, k, n)) | config
    _kernels()[1][(triton.cdiv(n, config["BLOCK_N"]),)](
        x, weight, weight_scale, input_scale if input_scale is not None else weight_scale,
        bias if bias is not None else weight_scale, out, m, n, x.stride(0), weight.stride(0), out.stride(0),
        K=k, M_PADDED=triton.next_power_of_2(m), STATIC=input_scale is not None and not prequantized, PREQUANTIZED=prequantized, HAS_BIAS=bias is not None,
        **config, **pdl_launch_options(x),
    )  # fmt: skip
    return out
