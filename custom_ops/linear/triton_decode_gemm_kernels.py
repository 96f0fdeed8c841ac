"""The decode GEMM's Triton kernel (triton_decode_gemm.py launches it): y [M, N] = x [M, K] . W[N, K]^T for a few rows,
taken as y^T = W . x^T on the tensor cores, over 8-bit operands with row and channel scales (W8A8) or 16-bit ones.
Importing this module needs triton; the launcher imports it on first use."""

import triton
import triton.language as tl


@triton.jit
def decode_gemm_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_up_ptr, w_scale_ptr, b_ptr, y_ptr, partial_ptr, count_ptr, M, N, stride_xm, stride_wn,
    stride_ym, K: tl.constexpr, M_PADDED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, SPLIT_K: tl.constexpr,
    K_SPLIT: tl.constexpr, USE_PDL: tl.constexpr, INT8: tl.constexpr = False, SCALED: tl.constexpr = True,
    SILU_MUL: tl.constexpr = False,
):  # fmt: skip
    """SCALED: y = (x8 . W8) s_x[m] s_w[n] (+ b[n]); else y = x . W (+ b). SILU_MUL (16-bit, no split): W is
    [gate; up], 2N rows (w_up_ptr: its row N), and y = silu(x . gate + b_gate) * (x . up + b_up), N columns: a
    program takes the same BLOCK_N channels of both halves, so the gated MLP's activation is this kernel's
    epilogue."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tile = tl.program_id(0)
    k_start = tl.program_id(1) * K_SPLIT  # this program's share of K (all of it without a split)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # PREFETCH tiles of this program's weights into L2 (one instruction per 128-byte line) before the PDL wait:
    # the weights are no kernel's output, so their first bytes can arrive while the previous kernel drains.
    if PREFETCH > 0:  # BLOCK_K * the weight's bytes a multiple of 128 then
        lines = tl.arange(0, BLOCK_K * w_ptr.dtype.element_ty.primitive_bitwidth // 1024) * (
            1024 // w_ptr.dtype.element_ty.primitive_bitwidth
        )
    for i in tl.static_range(PREFETCH):
        for half in tl.static_range(1 + SILU_MUL):
            line_ptrs = (w_up_ptr if half else w_ptr) + rows[:, None].to(tl.int64) * stride_wn + k_start + i * BLOCK_K
            in_bounds = (rows[:, None] < N) & (k_start + i * BLOCK_K + lines[None, :] < K)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [line_ptrs + lines[None, :], in_bounds.to(tl.int32)], dtype=tl.int32, is_pure=False,
                pack=1,
            )  # fmt: skip
    row_mask = rows < N
    ms = tl.arange(0, M_PADDED)
    m_mask = ms < M
    ks = tl.arange(0, BLOCK_K)
    w_offsets = rows[:, None].to(tl.int64) * stride_wn + k_start + ks[None, :]
    x_ptrs = x_ptr + ms[None, :] * stride_xm + k_start + ks[:, None]  # x^T: [BLOCK_K, M_PADDED]
    if SCALED:
        w_scale = tl.load(w_scale_ptr + rows, mask=row_mask, other=0.0)  # a parameter: before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if INT8:  # exact integer sums; a float32 sum of int8 products rounds past 2^24
        acc = tl.zeros([BLOCK_N, M_PADDED], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, M_PADDED], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, M_PADDED], dtype=tl.float32)  # the up half's sums (SILU_MUL; else unused)
    for k in range(0, K_SPLIT, BLOCK_K):
        k_mask = (ks < K - k_start - k) | EVEN_K  # EVEN_K: no mask, so the loads stay 16-byte vectors
        w_mask = row_mask[:, None] & k_mask[None, :]
        w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(w, x, acc, out_dtype=acc.dtype)
        if SILU_MUL:
            w_up = tl.load(w_up_ptr + w_offsets, mask=w_mask, other=0.0, eviction_policy="evict_first")
            up = tl.dot(w_up, x, up)
        w_offsets += BLOCK_K
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
            acc = tl.zeros_like(acc)
            for split in tl.static_range(SPLIT_K):  # from L2: other SMs wrote them
                acc += tl.load(partial_ptrs + split * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
        out_mask = out_mask & last
    out = acc.to(tl.float32)
    if SCALED:
        x_scale = tl.load(x_scale_ptr + ms, mask=m_mask, other=0.0)
        out = out * x_scale[None, :] * w_scale[:, None]  # the references' order: sum * s_x * s_w
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        if SILU_MUL:
            up += tl.load(b_ptr + N + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if SILU_MUL:
        out = out / (1.0 + tl.exp(-out)) * up
    y_ptrs = y_ptr + ms[None, :] * stride_ym + rows[:, None]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)
