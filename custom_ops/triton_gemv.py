"""A Triton GEMV for the few-row linears of decode steps: y[M, N] = x[M, K] @ W[N, K]^T for M <= 8.

With one to a few tokens a linear is a stream over its weight: every byte of W is read once and the
arithmetic is negligible. cuBLAS picks GEMM tiles for these shapes (an 8- or 64-row tile, sometimes
split-K with a second reduce kernel), which leaves small weights latency-bound and large ones short of
the copy bandwidth. Here each program owns BLOCK_N rows of W, streams them in BLOCK_K columns at a time
and dots them with all M rows of x, which it keeps in registers; no split-K, no second kernel.
"""

from __future__ import annotations

import functools

import torch

MAX_ROWS = 8  # x rows this kernel serves; larger batches go to cuBLAS (compute starts to matter)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, N, stride_xm, stride_wn, stride_ym,
        K: tl.constexpr, M: tl.constexpr, M_PADDED: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, M_PADDED)
        cols = tl.arange(0, BLOCK_K)
        row_mask = rows < N
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        x_ptrs = x_ptr + ms[:, None] * stride_xm + cols[None, :]
        acc = tl.zeros((M_PADDED, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(0, K, BLOCK_K):  # K is a model constant: unrolled
            if EVEN_K:
                w = tl.load(w_ptrs, mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=ms[:, None] < M, other=0.0)
            else:
                k_mask = (k + cols) < K
                w = tl.load(w_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=(ms[:, None] < M) & k_mask[None, :], other=0.0)
            x = x.to(tl.float32)
            if GATED:  # x holds [gate | up]: the input is silu(gate) * up, computed as it is read
                if EVEN_K:
                    up = tl.load(x_ptrs + K, mask=ms[:, None] < M, other=0.0).to(tl.float32)
                else:
                    up = tl.load(x_ptrs + K, mask=(ms[:, None] < M) & k_mask[None, :], other=0.0).to(tl.float32)
                # rounded where the model's own silu and product round (to x's dtype), as HF computes it
                x = (x * tl.sigmoid(x)).to(x_ptr.dtype.element_ty).to(tl.float32)
                x = (x * up).to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + ms[:, None] * stride_ym + rows[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(ms[:, None] < M) & row_mask[None, :])

    return gemv_kernel


def gemv_config(m: int, k: int) -> dict:
    """Tile shape. For one row, what a grid search on an H100 (`benchmarks/gemv_bench.py --search`) over
    the linears of SmolLM2-135M and Llama-3.1-8B found best in most cases: loads of 1024 columns (512 for
    a narrow K, which 1024 would mostly mask), 2 or 4 rows per program, 4 warps. More rows of x share the
    registers with fewer columns. (Per-shape choice is the kernel cache's job.)"""
    block_k = (512 if k < 1024 else 1024) // (1 if m <= 2 else 2 if m <= 4 else 4)
    return {"BLOCK_N": 2 if k < 1024 else 4, "BLOCK_K": block_k, "num_warps": 4}


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         gated: bool = False, **config) -> torch.Tensor:  # fmt: skip
    """x [M, K] (M <= MAX_ROWS, unit last stride) @ weight[N, K]^T (contiguous) + bias -> [M, N] in x's
    dtype. `gated`: x is [M, 2K] = [gate | up] and the input is silu(gate) * up. `config` overrides the
    tile shape (BLOCK_N, BLOCK_K, num_warps)."""
    m, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    n = weight.shape[0]
    if m > MAX_ROWS or x.stride(-1) != 1 or not weight.is_contiguous() or weight.shape[1] != k:
        raise ValueError(
            f"gemv takes at most {MAX_ROWS} rows with contiguous rows and a contiguous [N, {k}] weight; "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype or (bias is not None and (bias.shape != (n,) or not bias.is_contiguous())):
        raise ValueError(f"gemv: weight and bias must have x's dtype {x.dtype}, a contiguous bias [{n}]")
    import triton

    out = x.new_empty(m, n) if out is None else out
    config = config or gemv_config(m, k)
    num_warps = config.pop("num_warps", 4)
    _kernel()[(triton.cdiv(n, config["BLOCK_N"]),)](
        x, weight, bias if bias is not None else weight, out, n, x.stride(0), weight.stride(0), out.stride(0),
        K=k, M=m, M_PADDED=triton.next_power_of_2(m), HAS_BIAS=bias is not None, GATED=gated,
        EVEN_K=k % config["BLOCK_K"] == 0, num_warps=num_warps, **config,
    )  # fmt: skip
    return out
