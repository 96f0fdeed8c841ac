"""The Triton kernels of triton_moe.py (the grouped GEMMs of `compiled_llm::moe_experts` and its FP8 and MXFP4 forms).
Importing this module needs triton; triton_moe imports it on first use."""

import triton
import triton.language as tl


@triton.jit
def e2m1_as_fp16(code):
    """4-bit e2m1 codes (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6) as float16 values 2^-14
    times theirs, exactly, in a few integer ops: the sign to bit 15, the other three bits to bits 11-9 (the exponent's
    two low bits and the mantissa's top one; e2m1's one subnormal, 0.5, lands on a float16 subnormal)."""
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def mxfp4_dot(acc, a_base, w_base, s_base, k0, a_ok, w_ok, stride_wk, stride_sk, dtype, K: tl.constexpr,
              BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + a[:, k0 : k0 + BLOCK_K] @ W[k0 : k0 + BLOCK_K]: W's bytes (two e2m1 values each, the even column's in
    the low nibble) and e8m0 exponents (one per 32 columns, 2^(s - 127)) dequantized into `dtype` in registers, the
    even columns and the odd ones as two dots. BLOCK_K is a multiple of 32."""
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ok = half < K // 2
    a_even = tl.load(a_base + 2 * half[None, :], mask=a_ok & ok[None, :], other=0.0)
    a_odd = tl.load(a_base + 2 * half[None, :] + 1, mask=a_ok & ok[None, :], other=0.0)
    packed = tl.load(w_base + half[:, None] * stride_wk, mask=ok[:, None] & w_ok, other=0).to(tl.int32)
    # One exponent a group of 16 bytes, loaded once and repeated over them: 2^(s - 127) * 2^14 (e2m1_as_fp16's), as
    # float32 exponent bits; past 2^127 (s > 240: weights of 2^114 and more) +inf, never bits run into the sign.
    groups = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    scale = tl.load(s_base + groups[:, None] * stride_sk, mask=(groups < K // 32)[:, None] & w_ok, other=0)
    factor = (tl.minimum(scale.to(tl.int32) + 14, 255) << 23).to(tl.float32, bitcast=True)  # [BLOCK_K / 32, BLOCK_N]
    factor = tl.reshape(tl.broadcast_to(factor[:, None, :], (BLOCK_K // 32, 16, factor.shape[1])),
                        (BLOCK_K // 2, factor.shape[1]))  # fmt: skip
    low = (e2m1_as_fp16(packed & 15).to(tl.float32) * factor).to(dtype)
    high = (e2m1_as_fp16(packed >> 4).to(tl.float32) * factor).to(dtype)
    acc = tl.dot(a_even, low, acc, input_precision="ieee")
    return tl.dot(a_odd, high, acc, input_precision="ieee")


@triton.jit
def mxfp4_dot_scaled(acc, a_base, w_base, s_base, k0, a_ok, w_ok, stride_wk, stride_sk, K: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
    """mxfp4_dot through Triton's own microscaled dot (bf16 a only), which upcasts the e2m1 bytes where the target
    has no FP4 tensor cores (Hopper). Same layout: the bytes [BLOCK_K / 2, BLOCK_N] packed along K, low nibble
    first; the exponents given [N, K / 32]. The interpreter has no dot_scaled: a GPU-only candidate."""
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ok = half < K // 2
    cols = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(a_base + cols[None, :], mask=a_ok & (cols < K)[None, :], other=0.0)
    packed = tl.load(w_base + half[:, None] * stride_wk, mask=ok[:, None] & w_ok, other=0)
    groups = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    scale = tl.load(s_base + groups[:, None] * stride_sk, mask=(groups < K // 32)[:, None] & w_ok, other=0)
    return tl.dot_scaled(a, None, "bf16", packed, tl.trans(scale), "e2m1", acc)


@triton.jit
def float_dot(acc, a, w, FP8: tl.constexpr):
    """acc + a @ w on tensor cores, float32 sums: e4m3 operands (FP8), or float ones at full precision."""
    if FP8:
        acc = tl.dot(a, w, acc)
    else:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    return acc


@triton.jit
def step_dot(acc, a_base, w_base, s_base, k0, a_ok, w_ok, stride_wk, stride_sk, K: tl.constexpr, FP8: tl.constexpr,
             MXFP4: tl.constexpr, DOT_SCALED: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + a[:, k0 : k0 + BLOCK_K] @ W[k0 : k0 + BLOCK_K] in the weights' format, a's rows `a_base` and W's
    columns `w_base` (s_base: their MXFP4 exponents) read where a_ok and w_ok."""
    if MXFP4:
        if DOT_SCALED:
            acc = mxfp4_dot_scaled(acc, a_base, w_base, s_base, k0, a_ok, w_ok, stride_wk, stride_sk, K, BLOCK_K)
        else:
            acc = mxfp4_dot(acc, a_base, w_base, s_base, k0, a_ok, w_ok, stride_wk, stride_sk,
                            a_base.dtype.element_ty, K, BLOCK_K)  # fmt: skip
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_base + ks[None, :], mask=a_ok & k_ok[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None] * stride_wk, mask=k_ok[:, None] & w_ok, other=0.0)
        acc = float_dot(acc, a, w, FP8)
    return acc


@triton.jit
def grouped_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, route_w_ptr, sorted_pairs_ptr, block_expert_ptr, used_rows_ptr,
    a_scale_ptr, w_scale_ptr, round_ptr,
    pairs, N, top_k, stride_am, stride_we, stride_wn, stride_wk, up_offset, stride_be, stride_bn, bias_up_offset,
    stride_se, stride_sn, stride_sk, scale_up_offset, stride_om, alpha, limit, num_experts,
    K: tl.constexpr, ONE_TOKEN: tl.constexpr, SUM_PAIRS: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    A_PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ROUTE_WEIGHTS: tl.constexpr, FP8: tl.constexpr,
    MXFP4: tl.constexpr, DOT_SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """out[p, n] for the rows p of one block: a[row(p)] @ w[e]^T over K (+ bias); GATED: w's rows n are the gate's,
    its rows n + up_offset (elements) the up's, act(gate, up) written; ROUTE_WEIGHTS: times the pair's routing
    weight. FP8: a and w in e4m3, the product times a's row scale and w's (expert, row) scale. MXFP4: w holds K / 2
    bytes a row and w_scale K / 32 exponents (custom_ops/moe/mxfp4.py), dequantized into a's dtype (DOT_SCALED: by
    tl.dot_scaled, a bf16). Values round to round_ptr's dtype (the model's) where the reference's ops round. A block of
    an expert outside [0, num_experts) (another rank's) writes zeros and reads no weight.
    SUM_PAIRS (one token's down GEMM: its SUM_PAIRS = k pairs, one a row of a): a program per column tile writes
    out[0, n], the sum of the k weighted rows in float32 rounded once, instead of k rows.
    USE_PDL (triton_runtime): which weights to read is the routing's output, so a program waits before any load."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if SUM_PAIRS:  # row j is pair j
        rows = tl.arange(0, BLOCK_M).to(tl.int64)
    elif ONE_TOKEN:  # a block per pair, its first row; block_expert_ptr: the ids themselves
        rows = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, pairs).to(tl.int64)
    else:
        if pid_m * BLOCK_M >= tl.load(used_rows_ptr):
            return
        rows = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < pairs
    a_rows = rows // top_k if A_PER_TOKEN else rows
    a_base = a_ptr + a_rows[:, None] * stride_am
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    col_offsets = cols[None, :].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SUM_PAIRS:
        # Row j of a tile holds pair j's row alone, so one accumulator takes every pair's product with its own expert,
        # and one loop over (pair, K step) keeps the weight loads in flight across the pairs.
        K_STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        experts = tl.load(block_expert_ptr + rows, mask=valid, other=-1).to(tl.int64)
        for step in range(SUM_PAIRS * K_STEPS):
            pair = step // K_STEPS
            # The pair's expert picked from registers: loaded here, it would hold back by a pipeline stage the weight
            # loads whose addresses need it (one buffer in flight at 3 stages instead of two).
            expert = tl.sum(tl.where(rows == pair, experts, 0))
            local = (expert >= 0) & (expert < num_experts)  # another rank's expert (expert parallelism): no read
            acc = step_dot(acc, a_base, w_ptr + expert * stride_we + col_offsets * stride_wn,
                           w_scale_ptr + expert * stride_se + col_offsets * stride_sn, (step % K_STEPS) * BLOCK_K,
                           (rows == pair)[:, None], col_ok[None, :] & local, stride_wk, stride_sk, K, FP8, MXFP4,
                           DOT_SCALED, BLOCK_K)  # fmt: skip
        row_experts = experts[:, None]
        weight_ok = valid[:, None] & (row_experts >= 0) & (row_experts < num_experts) & col_ok[None, :]
    else:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if (expert < 0) | (expert >= num_experts):  # another rank's expert (expert parallelism): its pairs add zero
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], zeros, mask=valid[:, None] & col_ok[None, :])
            return
        w_base = w_ptr + expert * stride_we + col_offsets * stride_wn
        if MXFP4:  # a byte holds columns 2h and 2h + 1: the even and odd columns of a are two dots' inputs
            s_base = w_scale_ptr + expert * stride_se + col_offsets * stride_sn
            for k0 in range(0, K, BLOCK_K):
                acc = step_dot(acc, a_base, w_base, s_base, k0, valid[:, None], col_ok[None, :], stride_wk, stride_sk,
                               K, FP8, MXFP4, DOT_SCALED, BLOCK_K)  # fmt: skip
                if GATED:
                    acc_up = step_dot(acc_up, a_base, w_base + up_offset, s_base + scale_up_offset, k0,
                                      valid[:, None], col_ok[None, :], stride_wk, stride_sk, K, FP8, MXFP4, DOT_SCALED,
                                      BLOCK_K)  # fmt: skip
        else:
            ks = tl.arange(0, BLOCK_K)
            a_ptrs = a_base + ks[None, :]
            w_ptrs = w_base + ks[:, None] * stride_wk
            for k0 in range(0, K, BLOCK_K):  # K constexpr: the interpreter takes no runtime loop bound
                k_ok = ks < K - k0
                a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = float_dot(acc, a, w, FP8)
                if GATED:
                    w_up = tl.load(w_ptrs + up_offset, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    acc_up = float_dot(acc_up, a, w_up, FP8)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wk
        row_experts = expert
        weight_ok = col_ok[None, :]
    if FP8:  # (sum * s_a) * s_w, as fp8_linear's reference
        a_scale = tl.load(a_scale_ptr + a_rows, mask=valid, other=0.0)[:, None]
        scale_ptrs = w_scale_ptr + row_experts * stride_se + cols[None, :] * stride_sn
        acc = acc * a_scale * tl.load(scale_ptrs, mask=weight_ok, other=0.0)
        if GATED:
            acc_up = acc_up * a_scale * tl.load(scale_ptrs + scale_up_offset, mask=weight_ok, other=0.0)
    dtype = round_ptr.dtype.element_ty
    out = gated_epilogue(acc, acc_up, bias_ptr + row_experts * stride_be + cols[None, :] * stride_bn, weight_ok,
                         bias_up_offset, alpha, limit, dtype, HAS_BIAS, GATED, ACTIVATION)  # fmt: skip
    if ROUTE_WEIGHTS:
        out = route_weighted(out, tl.load(route_w_ptr + rows, mask=valid, other=0.0)[:, None], dtype, SUM_PAIRS > 0)
    if SUM_PAIRS:
        out = tl.where(weight_ok, out, 0.0)  # the pairs of another rank's experts add zero
        tl.store(out_ptr + pid_m * stride_om + cols, tl.sum(out, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def gated_epilogue(acc, acc_up, bias_ptrs, bias_ok, bias_up_offset, alpha, limit, dtype, HAS_BIAS: tl.constexpr,
                   GATED: tl.constexpr, ACTIVATION: tl.constexpr):  # fmt: skip
    """The GEMM's float32 sums [rows, BLOCK_N] (and the up rows' where GATED) to the float32 output before the routing
    weight: + bias (bias_ptrs [1 or rows, BLOCK_N], read where bias_ok), the activation, each rounded to the model's
    `dtype` where the reference's ops round (the GEMM, the bias add, each activation op)."""
    out = acc.to(dtype).to(tl.float32)
    if HAS_BIAS:
        out = (out + tl.load(bias_ptrs, mask=bias_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    if GATED:
        up = acc_up.to(dtype).to(tl.float32)
        if HAS_BIAS:
            up_bias = tl.load(bias_ptrs + bias_up_offset, mask=bias_ok, other=0.0).to(tl.float32)
            up = (up + up_bias).to(dtype).to(tl.float32)
        if ACTIVATION == 0:  # silu(gate) * up
            out = (out * tl.sigmoid(out)).to(dtype).to(tl.float32) * up
        else:  # GPT-OSS: gate clamped above, up both ways; gate * sigmoid(alpha * gate) * (up + 1)
            gate = tl.minimum(out, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            sig = tl.sigmoid((gate * alpha).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            glu = (gate * sig).to(dtype).to(tl.float32)
            out = (up + 1.0).to(dtype).to(tl.float32) * glu
    return out


@triton.jit
def route_weighted(out, route_w, dtype: tl.constexpr, SUMMED: tl.constexpr):
    """A pair's epilogue output (float32) times its routing weight, with the reference's roundings: the output in
    `dtype` (the model's), the product in torch's promotion of it and the weights' dtype, which among the kernels'
    dtypes is the model's where the two agree, else float32. SUMMED: the product is a term of the kernel's own sum, so
    rounded here (a product the kernel stores rounds in the store)."""
    out = out.to(dtype).to(tl.float32) * route_w.to(tl.float32)
    if SUMMED and route_w.dtype == dtype:
        out = out.to(dtype).to(tl.float32)
    return out


@triton.jit
def sum_pairs_kernel(weighted_ptr, out_ptr, N, TOP_K: tl.constexpr, PAIRS_PADDED: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_PDL: tl.constexpr = False):  # fmt: skip
    """out[t, n] = the sum over j < TOP_K of weighted[t * TOP_K + j, n] (both contiguous) in float32, rounded once to
    out's dtype; a program loads its column tile's k rows at once."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    token, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, PAIRS_PADDED)
    rows = token * TOP_K + pairs
    values = tl.load(weighted_ptr + rows[:, None] * N + cols[None, :],
                     mask=(pairs < TOP_K)[:, None] & (cols < N)[None, :], other=0.0)  # fmt: skip
    total = tl.sum(values.to(tl.float32), axis=0)
    tl.store(out_ptr + token * N + cols, total.to(out_ptr.dtype.element_ty), mask=cols < N)
