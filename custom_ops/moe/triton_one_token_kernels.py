"""The Triton kernels of one token's MoE GEMMs without tensor cores (triton_moe.grouped_gemm under a "gemv" tile): a
decode step of one sequence has one row an expert, so each program dots its pair's row with BLOCK_N weight rows on
the CUDA cores, float, e4m3 or MXFP4 weights (decoded in registers), and one_token_epilogue_kernel finishes the sums
of gluon_mxfp4's tensor-core form the same way. Importing this module needs triton; triton_moe imports it on first
use."""

import triton
import triton.language as tl

from custom_ops.linear.triton_int4_kernels import word_columns
from custom_ops.moe.triton_moe import GEMV_UNROLLED_STEPS
from custom_ops.moe.triton_moe_kernels import gated_epilogue, route_weighted

UNROLLED_STEPS: tl.constexpr = tl.constexpr(GEMV_UNROLLED_STEPS)  # one_token_pair's unrolled K loop, at most


@triton.jit
def e2m1_pairs_as_fp16x2(words, shift):
    """Nibbles j and j + 4 of each int32 word (`shift` = 12 - 4j, j < 4) as the bits of two float16 values, 2^-14
    times theirs as e2m1_as_fp16 makes them, in the low and the high half: one shift brings both nibbles' signs to bits
    15 and 31, and from there a shift by 3 their other bits to 11-9 and 27-25, so two values cost ~4 integer ops."""
    s = words << shift
    return (s & -0x7FFF8000) | ((s >> 3) & 0x0E000E00)  # -0x7FFF8000: 0x80008000 as an int32


@triton.jit
def fp16x2_as_float32(bits):
    """The two float16 values whose bits the halves of `bits` (int32) hold, as float32 (exactly)."""
    low = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def add_pair_products(sums, words, shift, x_low, x_high):
    """sums [BLOCK_N, G, 4] + each word's nibbles j and j + 4 (e2m1_pairs_as_fp16x2's `shift`) times their columns of
    x ([G, 4] each), one multiply-add a weight."""
    low, high = fp16x2_as_float32(e2m1_pairs_as_fp16x2(words, shift))
    sums = sums + low * x_low[None, :, :]
    return sums + high * x_high[None, :, :]


@triton.jit
def mxfp4_row_dot(acc, x_row, w_rows, s_rows, k0, col_ok, stride_sk, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K // 32] + the products of W[:, k0 : k0 + BLOCK_K] and x[k0 : k0 + BLOCK_K] for one row x,
    summed per 32-column group and scaled by the group's exponent: W's MXFP4 rows `w_rows` (int32 pointers
    [BLOCK_N, 1]: the bytes read as words of 8 columns, low nibble first) and their exponents `s_rows`. A weight
    costs ~2 integer ops, a conversion and one multiply-add; the caller sums the groups once, after its K loop.
    BLOCK_K is a multiple of 32."""
    G: tl.constexpr = BLOCK_K // 32
    groups = k0 // 32 + tl.arange(0, G)
    group_ok = groups < K // 32
    word = groups[:, None] * 4 + tl.arange(0, 4)[None, :]  # [G, 4]: a group's 4 words
    words = tl.load(w_rows[:, :, None] + word[None, :, :], mask=col_ok[:, None, None] & group_ok[None, :, None],
                    other=0)  # fmt: skip
    x = tl.load(x_row + word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :], mask=group_ok[:, None, None],
                other=0.0).to(tl.float32)  # fmt: skip
    # x [G, 4, 8] -> its column j of each word (j = 4 h + 2 j1 + j0) as [G, 4] tensors, by splits of the last axis
    x_even, x_odd = tl.split(tl.reshape(x, (G, 4, 2, 2, 2)))  # j0
    x_0l, x_0h, x_1l, x_1h, x_2l, x_2h, x_3l, x_3h = word_columns(x_even, x_odd)
    sums = tl.zeros(words.shape, dtype=tl.float32)
    sums = add_pair_products(sums, words, 12, x_0l, x_0h)
    sums = add_pair_products(sums, words, 8, x_1l, x_1h)
    sums = add_pair_products(sums, words, 4, x_2l, x_2h)
    sums = add_pair_products(sums, words, 0, x_3l, x_3h)
    scale = tl.load(s_rows + groups[None, :] * stride_sk, mask=col_ok[:, None] & group_ok[None, :], other=0)
    # 2^(s - 127) exactly for every s (its bits, and 2^-127's for 0), after the sums' own 2^14 (e2m1_as_fp16's)
    bits = scale.to(tl.int32) << 23
    factor = tl.where(bits == 0, 0x00400000, bits).to(tl.float32, bitcast=True)
    return acc + (tl.sum(sums, axis=2) * 16384.0) * factor


@triton.jit
def float_row_step(acc, acc_up, x_row, w_rows, w_ok, k0, stride_wk, up_offset, K: tl.constexpr, BLOCK_K: tl.constexpr,
                   GATED: tl.constexpr):  # fmt: skip
    """acc (and acc_up) [BLOCK_N] + the products of W's rows `w_rows` (and their up rows) with one row x over columns
    k0 to k0 + BLOCK_K, in float32."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    x = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    w_mask = w_ok[:, None] & k_ok[None, :]
    w = tl.load(w_rows + ks[None, :] * stride_wk, mask=w_mask, other=0.0)
    acc += tl.sum(w.to(tl.float32) * x, axis=1)
    if GATED:
        w_up = tl.load(w_rows + up_offset + ks[None, :] * stride_wk, mask=w_mask, other=0.0)
        acc_up += tl.sum(w_up.to(tl.float32) * x, axis=1)
    return acc, acc_up


@triton.jit
def one_token_pair(
    pair, a_ptr, w_ptr, bias_ptr, route_w_ptr, ids_ptr, a_scale_ptr, w_scale_ptr, cols, col_ok, top_k, stride_am,
    stride_we, stride_wn, stride_wk, up_offset, stride_be, stride_bn, bias_up_offset, stride_se, stride_sn, stride_sk,
    scale_up_offset, alpha, limit, num_experts, dtype: tl.constexpr, K: tl.constexpr, GATED: tl.constexpr,
    ACTIVATION: tl.constexpr, A_PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ROUTE_WEIGHTS: tl.constexpr,
    FP8: tl.constexpr, MXFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    SUMMED: tl.constexpr = False,
):  # fmt: skip
    """One pair's output columns `cols` in float32, after the epilogue and its routing weight (route_weighted, SUMMED:
    a term of the kernel's sum); a pair of an expert outside [0, num_experts) (another rank's) reads no weight and gives
    zeros. Float and e4m3 weights at STAGES == 1 in at most UNROLLED_STEPS steps: the K loop unrolled, so every step's
    loads can be in flight at once (whole rows at the widest tiles, as the dense GEMV reads them); more steps stay a
    loop (unrolled, a 16 x 256 tile over K = 7,168 was 8,272 instructions against 528)."""
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    local = (expert >= 0) & (expert < num_experts)
    a_row = pair // top_k if A_PER_TOKEN else pair
    x_row = a_ptr + a_row * stride_am
    w_ok = col_ok & local
    w_rows = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    if MXFP4:  # the bytes as int32 words (the caller checked their alignment and unit stride)
        s_rows = w_scale_ptr + expert * stride_se + cols[:, None].to(tl.int64) * stride_sn
        acc = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)  # per exponent group: summed after the loop
        acc_up = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            acc = mxfp4_row_dot(acc, x_row, w_rows.to(tl.pointer_type(tl.int32)), s_rows, k0, w_ok, stride_sk, K,
                                BLOCK_K)  # fmt: skip
            if GATED:
                acc_up = mxfp4_row_dot(acc_up, x_row, (w_rows + up_offset).to(tl.pointer_type(tl.int32)),
                                       s_rows + scale_up_offset, k0, w_ok, stride_sk, K, BLOCK_K)  # fmt: skip
        acc, acc_up = tl.sum(acc, axis=1), tl.sum(acc_up, axis=1)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if STAGES == 1 and K <= UNROLLED_STEPS * BLOCK_K:
            for k0 in tl.static_range(0, K, BLOCK_K):
                acc, acc_up = float_row_step(acc, acc_up, x_row, w_rows, w_ok, k0, stride_wk, up_offset, K, BLOCK_K,
                                             GATED)  # fmt: skip
        else:
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                acc, acc_up = float_row_step(acc, acc_up, x_row, w_rows, w_ok, k0, stride_wk, up_offset, K, BLOCK_K,
                                             GATED)  # fmt: skip
    if FP8:  # (sum * s_a) * s_w, as fp8_linear's reference
        a_scale = tl.load(a_scale_ptr + a_row)
        scale_ptrs = w_scale_ptr + expert * stride_se + cols * stride_sn
        acc = acc * a_scale * tl.load(scale_ptrs, mask=w_ok, other=0.0)
        if GATED:
            acc_up = acc_up * a_scale * tl.load(scale_ptrs + scale_up_offset, mask=w_ok, other=0.0)
    out = gated_epilogue(acc[None, :], acc_up[None, :], bias_ptr + expert * stride_be + cols[None, :] * stride_bn,
                         w_ok[None, :], bias_up_offset, alpha, limit, dtype, HAS_BIAS, GATED, ACTIVATION)  # fmt: skip
    if ROUTE_WEIGHTS:
        out = route_weighted(out, tl.load(route_w_ptr + pair), dtype, SUMMED)
    return tl.where(local, out, 0.0)


@triton.jit
def pairs_row_sum(
    a_ptr, w_ptr, bias_ptr, route_w_ptr, ids_ptr, a_scale_ptr, w_scale_ptr, cols, col_ok, stride_am, stride_we,
    stride_wn, stride_wk, stride_be, stride_bn, stride_se, stride_sn, num_experts, dtype: tl.constexpr,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, FP8: tl.constexpr, PAIRS: tl.constexpr, PADDED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One token's down GEMM over its PAIRS pairs (row p of a is pair p's), weighted and summed: [BLOCK_N] float32
    over columns `cols`, with one_token_pair's roundings a pair. All the pairs' weights as one [pairs, BLOCK_N,
    BLOCK_K] tile, the products summed over K once, after the loop: a reduction across warps waits at a barrier, which
    no load after it passes, so per pair or per step it would leave one pair's loads in flight at a time."""
    pairs = tl.arange(0, PADDED)
    experts = tl.load(ids_ptr + pairs, mask=pairs < PAIRS, other=-1).to(tl.int64)
    local = (pairs < PAIRS) & (experts >= 0) & (experts < num_experts)  # another rank's expert: no read, adds zero
    w_ok = local[:, None] & col_ok[None, :]
    w_rows = w_ptr + experts[:, None, None] * stride_we + cols[None, :, None].to(tl.int64) * stride_wn
    x_rows = a_ptr + pairs[:, None].to(tl.int64) * stride_am
    products = tl.zeros((PADDED, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=(pairs < PAIRS)[:, None] & (ks < K)[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, None, :] * stride_wk, mask=w_ok[:, :, None] & (ks < K)[None, None, :],
                    other=0.0)  # fmt: skip
        products += w.to(tl.float32) * x.to(tl.float32)[:, None, :]
    acc = tl.sum(products, axis=2)
    if FP8:  # (sum * s_a) * s_w, as fp8_linear's reference
        a_scale = tl.load(a_scale_ptr + pairs, mask=pairs < PAIRS, other=0.0)
        acc = acc * a_scale[:, None] * tl.load(w_scale_ptr + experts[:, None] * stride_se + cols[None, :] * stride_sn,
                                               mask=w_ok, other=0.0)  # fmt: skip
    out = gated_epilogue(acc, acc, bias_ptr + experts[:, None] * stride_be + cols[None, :] * stride_bn, w_ok, 0, 0.0,
                         0.0, dtype, HAS_BIAS, False, 0)  # fmt: skip
    out = route_weighted(out, tl.load(route_w_ptr + pairs, mask=pairs < PAIRS, other=0.0)[:, None], dtype, True)
    return tl.sum(tl.where(w_ok, out, 0.0), axis=0)


@triton.jit
def one_token_gemv_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, route_w_ptr, ids_ptr, a_scale_ptr, w_scale_ptr, round_ptr,
    N, top_k, stride_am, stride_we, stride_wn, stride_wk, up_offset, stride_be, stride_bn, bias_up_offset,
    stride_se, stride_sn, stride_sk, scale_up_offset, stride_om, alpha, limit, num_experts,
    K: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, A_PER_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROUTE_WEIGHTS: tl.constexpr, FP8: tl.constexpr, MXFP4: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 1, SUM_PAIRS: tl.constexpr = 0,
    PAIRS_PADDED: tl.constexpr = 1, USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """grouped_gemm_kernel's ONE_TOKEN case without tensor cores: out[pair, cols] for the program's pair and
    BLOCK_N columns, its row of a dotted with each weight row in float32 (a decode step of one sequence has one row
    an expert: a tensor-core tile would be 1/16 used, and its operand layout costs more than the products). Same
    arguments and roundings; ids_ptr: the pairs' experts (one outside [0, num_experts): zeros, no weight read).
    STAGES > 1 pipelines the K loop's loads that many steps ahead (cp.async into shared memory): Triton pipelines a
    loop without a dot only when told, and unpipelined each step waits out a whole load's latency.
    SUM_PAIRS (one token's down GEMM, SUM_PAIRS = its k pairs; grid axis 0 of one program): out[0, cols] is the sum of
    the k pairs' weighted rows in float32, rounded once, as grouped_gemm_kernel's SUM_PAIRS: no sum kernel after it
    (PAIRS_PADDED: SUM_PAIRS's next power of 2). USE_PDL: as grouped_gemm_kernel's."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dtype = round_ptr.dtype.element_ty
    if SUM_PAIRS and not MXFP4:
        total = pairs_row_sum(a_ptr, w_ptr, bias_ptr, route_w_ptr, ids_ptr, a_scale_ptr, w_scale_ptr, cols, col_ok,
                              stride_am, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_se, stride_sn,
                              num_experts, dtype, K, HAS_BIAS, FP8, SUM_PAIRS, PAIRS_PADDED, BLOCK_N, BLOCK_K)  # fmt: skip
        tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)
    elif SUM_PAIRS:  # MXFP4: a pair at a time (mxfp4_row_dot's tiles are one row's)
        total = tl.zeros((1, BLOCK_N), dtype=tl.float32)
        for pair in tl.static_range(SUM_PAIRS):
            out = one_token_pair(pair, a_ptr, w_ptr, bias_ptr, route_w_ptr, ids_ptr, a_scale_ptr, w_scale_ptr, cols,
                                 col_ok, top_k, stride_am, stride_we, stride_wn, stride_wk, up_offset, stride_be,
                                 stride_bn, bias_up_offset, stride_se, stride_sn, stride_sk, scale_up_offset, alpha,
                                 limit, num_experts, dtype, K, GATED, ACTIVATION, A_PER_TOKEN, HAS_BIAS, ROUTE_WEIGHTS,
                                 FP8, MXFP4, BLOCK_N, BLOCK_K, STAGES, SUMMED=True)  # fmt: skip
            total += out
        tl.store(out_ptr + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])
    else:
        pair = tl.program_id(0)
        out = one_token_pair(pair, a_ptr, w_ptr, bias_ptr, route_w_ptr, ids_ptr, a_scale_ptr, w_scale_ptr, cols, col_ok,
                             top_k, stride_am, stride_we, stride_wn, stride_wk, up_offset, stride_be, stride_bn,
                             bias_up_offset, stride_se, stride_sn, stride_sk, scale_up_offset, alpha, limit,
                             num_experts, dtype, K, GATED, ACTIVATION, A_PER_TOKEN, HAS_BIAS, ROUTE_WEIGHTS, FP8, MXFP4,
                             BLOCK_N, BLOCK_K, STAGES)  # fmt: skip
        tl.store(out_ptr + pair * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def one_token_epilogue_kernel(
    raw_ptr, bias_ptr, out_ptr, route_w_ptr, ids_ptr, round_ptr, N, stride_raw, raw_col, raw_up, stride_be, stride_bn,
    stride_om, alpha, limit, num_experts, GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUTE_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """one_token_gemv_kernel's epilogue over sums another kernel wrote (raw [pairs, R] float32, every row of the
    pair's expert weight): output column c reads raw column c * raw_col (and, GATED, its up row's at + raw_up; the
    bias the same columns of bias[expert]). Same roundings; a pair of another rank's expert gets zeros. USE_PDL
    (triton_runtime): it launches under the sums' kernel and waits before reading anything."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pair, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if (expert < 0) | (expert >= num_experts):
        tl.store(out_ptr + pair * stride_om + cols, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty), mask=col_ok)
        return
    raw = raw_ptr + pair * stride_raw + cols * raw_col
    acc = tl.load(raw, mask=col_ok, other=0.0)
    acc_up = tl.load(raw + raw_up, mask=col_ok, other=0.0) if GATED else acc
    dtype = round_ptr.dtype.element_ty
    bias_ptrs = bias_ptr + expert * stride_be + (cols * raw_col)[None, :] * stride_bn
    out = gated_epilogue(acc[None, :], acc_up[None, :], bias_ptrs, col_ok[None, :], raw_up * stride_bn, alpha, limit,
                         dtype, HAS_BIAS, GATED, ACTIVATION)  # fmt: skip
    if ROUTE_WEIGHTS:
        out = route_weighted(out, tl.load(route_w_ptr + pair), dtype, False)
    tl.store(out_ptr + pair * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])
