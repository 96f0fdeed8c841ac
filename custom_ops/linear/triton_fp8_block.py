"""The Triton kernel of `compiled_llm::fp8_block_linear`'s `triton` backend, in the op's numerics (fp8_block.py).

A GEMM tiled BLOCK_M x BLOCK_N (BLOCK_N divides 128, so a tile's rows share one weight scale per group) that walks
K one 128-column group at a time: it loads x's group, finds each row's amax and rounds it to e4m3 (the group is
the whole quantization unit, so no pass over x comes first), multiplies on the FP8 tensor cores into a float32
partial, and adds partial * s_x * s_w to a float32 accumulator, the order the reference takes. One kernel a linear.
"""

from __future__ import annotations

import functools

import torch

GROUP = 128  # fp8_block.BLOCK


@functools.cache
def _kernel():
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
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    return fp8_block_gemm_kernel


def fp8_block_gemm_config(m: int) -> dict:
    """Tile by row count: 16 rows (tl.dot's least) for decode batches, 64 and 128 for prefill chunks. A first
    guess, to be replaced by measurements (autotune/) once the kernel has run on an H200."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}


def fp8_block_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   **config) -> torch.Tensor:  # fmt: skip
    """x [M, K] (unit last stride) against e4m3 weight [N, K] (contiguous) with block scales [ceil(N/128),
    ceil(K/128)] -> [M, N] in x's dtype; the caller checked the shapes (fp8_block.py). `config` overrides the
    tile (BLOCK_M, BLOCK_N: a power of two dividing 128, num_warps)."""
    import triton

    m, k = x.shape
    n = weight.shape[0]
    out = x.new_empty(m, n)
    config = fp8_block_gemm_config(m) | config
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    _kernel()[grid](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, x.stride(0), weight.stride(0),
        weight_scale.stride(0), out.stride(0), K=k, HAS_BIAS=bias is not None, **config,
    )  # fmt: skip
    return out
