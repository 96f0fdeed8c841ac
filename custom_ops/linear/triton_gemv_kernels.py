"""The Triton kernel of the one-to-few-row GEMV (triton_gemv.py launches it; see there for the algorithm). Importing
this module needs triton; the launcher imports it on first use."""

import triton
import triton.language as tl


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, stride_xm, stride_wn, stride_ym, up_offset,
    K: tl.constexpr, M: tl.constexpr, M_PADDED: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, M_PADDED)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn

    # The first PREFETCH_K columns of the weights: loaded before the wait, since the weights are no
    # kernel's output (with PDL this load overlaps the end of the previous kernel).
    pre = tl.arange(0, PREFETCH_K)
    if PREFETCH_K <= K:  # the rows alone mask (as in the loop's EVEN_K case)
        w_mask = row_mask[:, None]
        x_mask = ms[:, None] < M
    else:
        w_mask = row_mask[:, None] & (pre < K)[None, :]
        x_mask = (ms[:, None] < M) & (pre < K)[None, :]
    w = tl.load(w_rows + pre[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
    if SILU_MUL:
        w_up = tl.load(w_rows + up_offset + pre[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    dtype = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + ms[:, None] * stride_xm + pre[None, :], mask=x_mask, other=0.0)
    x = x.to(tl.float32)
    acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SILU_MUL:
        acc_up = tl.sum(x[:, None, :] * w_up.to(tl.float32)[None, :, :], axis=2)

    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_rows + PREFETCH_K + cols[None, :]
    x_ptrs = x_ptr + ms[:, None] * stride_xm + PREFETCH_K + cols[None, :]
    for k in tl.static_range(PREFETCH_K, K, BLOCK_K):  # K is a model constant: unrolled
        if EVEN_K:
            w = tl.load(w_ptrs, mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
            if SILU_MUL:
                w_up = tl.load(w_ptrs + up_offset, mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=ms[:, None] < M, other=0.0)
        else:
            k_mask = (k + cols) < K
            w_mask = row_mask[:, None] & k_mask[None, :]
            w = tl.load(w_ptrs, mask=w_mask, other=0.0, eviction_policy="evict_first")
            if SILU_MUL:
                w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=(ms[:, None] < M) & k_mask[None, :], other=0.0)
        x = x.to(tl.float32)
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if SILU_MUL:
            acc_up += tl.sum(x[:, None, :] * w_up.to(tl.float32)[None, :, :], axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(b_ptr + N + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:  # rounded where the model's linear, silu and product each round, as HF computes it
        gate = acc.to(dtype).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    y_ptrs = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    tl.store(y_ptrs, acc.to(dtype), mask=(ms[:, None] < M) & row_mask[None, :])
