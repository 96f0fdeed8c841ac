"""The Triton kernel of the one-to-few-row GEMV (triton_gemv.py launches it; see there for the algorithm), with the
residual add and RMSNorm of `compiled_llm::add_rms_norm_linear` as an optional prologue (NORM). Importing this module
needs triton; the launcher imports it on first use."""

import triton
import triton.language as tl


@triton.jit
def added(x, r_ptr, ms, cols, mask, stride_rm, dtype: tl.constexpr):
    """h = x + r over columns `cols`, rounded to the model's dtype as the residual add rounds it."""
    r = tl.load(r_ptr + ms[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
    return (x.to(tl.float32) + r.to(tl.float32)).to(dtype)


@triton.jit
def normalized(h, norm_w_ptr, total_ptr, normed_ptr, ms, cols, mask, rstd, K: tl.constexpr, dtype: tl.constexpr):
    """Columns `cols` of add_rms_norm's norm of h, as op.py's kernel rounds it: w * (h * rstd), each product rounded
    to the model's dtype; program 0 stores it and h ([M, K], contiguous)."""
    w = tl.load(norm_w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    normed = (w[None, :] * (h.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
    first = mask & (tl.program_id(0) == 0)
    tl.store(total_ptr + ms[:, None] * K + cols[None, :], h, mask=first)
    tl.store(normed_ptr + ms[:, None] * K + cols[None, :], normed, mask=first)
    return normed


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, stride_xm, stride_wn, stride_ym, up_offset,
    r_ptr, norm_w_ptr, total_ptr, normed_ptr, stride_rm, eps,  # NORM only
    K: tl.constexpr, M: tl.constexpr, M_PADDED: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr, NORM: tl.constexpr = False,
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
    if NORM:
        if PREFETCH_K >= K:  # the whole row in the first step: its h serves the sum of squares and the norm
            h = added(x, r_ptr, ms, pre, x_mask, stride_rm, dtype)
            squares = tl.sum(h.to(tl.float32) * h.to(tl.float32), axis=1)
        else:  # each row's sum of squares of h over all of K first
            squares = tl.zeros([M_PADDED], dtype=tl.float32)
            for k in tl.static_range(0, K, BLOCK_K):
                cols = k + tl.arange(0, BLOCK_K)
                hmask = (ms[:, None] < M) & (cols < K)[None, :]
                part = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=hmask, other=0.0)
                part = added(part, r_ptr, ms, cols, hmask, stride_rm, dtype).to(tl.float32)
                squares += tl.sum(part * part, axis=1)
            h = added(x, r_ptr, ms, pre, x_mask, stride_rm, dtype)
        rstd = tl.rsqrt(squares / K + eps)
        x = normalized(h, norm_w_ptr, total_ptr, normed_ptr, ms, pre, x_mask, rstd, K, dtype)
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
        if NORM:
            x_mask = (ms[:, None] < M) & (k + cols < K)[None, :]
            h = added(x, r_ptr, ms, k + cols, x_mask, stride_rm, dtype)
            x = normalized(h, norm_w_ptr, total_ptr, normed_ptr, ms, k + cols, x_mask, rstd, K, dtype)
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
