"""The Triton kernels of 4-bit weights: triton_int4.py's (`compiled_llm::int4_linear`'s `triton` backend; the numerics
are int4.py's) and triton_nvfp4.py's (`compiled_llm::nvfp4_linear`'s, E2M1 codes with e4m3 scales: nvfp4.py). Both
store two codes a byte, column 2j in the low nibble, so the GEMV reads them alike. Importing this module needs triton;
the launchers import it on first use."""

import triton
import triton.language as tl


@triton.jit
def word_columns(x_even, x_odd):
    """x's columns as a packed word of 8 codes meets them (column j = 4 h + 2 j1 + j0), from its even and odd columns
    [..., 2 (j1), 2 (h)]: the pairs (j, j + 4) for j = 0 to 3, each [...]: (x0, x4, x1, x5, x2, x6, x3, x7)."""
    x_0, x_2 = tl.split(x_even)  # j1
    x_1, x_3 = tl.split(x_odd)
    x_0l, x_0h = tl.split(x_0)  # h
    x_1l, x_1h = tl.split(x_1)
    x_2l, x_2h = tl.split(x_2)
    x_3l, x_3h = tl.split(x_3)
    return x_0l, x_0h, x_1l, x_1h, x_2l, x_2h, x_3l, x_3h


@triton.jit
def add_pair_products(sums, words, shift, zero16, x_low, x_high):
    """sums + the products of codes j and j + 4 of each int32 word (`shift` = 4 j, j < 4), minus their group's zero
    point, with their columns of x: (word >> 4 j) & 0x000F000F | 0x64006400 holds the float16 values 1024 + q in its
    halves, and 1024 + z (`zero16`, float16) taken from each leaves q - z exactly. Two multiply-adds, each its own
    (one expression of both costs a multiply and an add more)."""
    bits = ((words >> shift) & 0x000F000F) | 0x64006400
    low = bits.to(tl.int16).to(tl.float16, bitcast=True)
    high = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    sums = sums + (low - zero16).to(tl.float32) * x_low[None, :, :]
    return sums + (high - zero16).to(tl.float32) * x_high[None, :, :]


@triton.jit
def add_pair_products_ptx(sums, words, shift, zero_pair, x_low, x_high):
    """add_pair_products in inline PTX: one `lop3` makes both float16 values 1024 + q of a pair, one `sub.f16x2`
    takes 1024 + z (`zero_pair`: its float16 bits in both halves) from both, and each half converts to float32 from
    its own register, so no PRMT pairs halves of two words (3.5 instructions a weight against ~6.9). GPU only: the
    interpreter runs no PTX (tests/test_int4_linear.py holds it to the reference on the GPU)."""
    low, high = tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t;
        .reg .b16 lo, hi;
        lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 t, t, $3;
        mov.b32 {lo, hi}, t;
        cvt.f32.f16 $0, lo;
        cvt.f32.f16 $1, hi;
        }
        """,
        constraints="=f,=f,r,r",
        args=[words >> shift, zero_pair],
        dtype=(tl.float32, tl.float32),
        is_pure=True,
        pack=1,
    )
    sums = sums + low * x_low[None, :, :]
    return sums + high * x_high[None, :, :]


@triton.jit
def add_pair_products_e2m1(sums, words, shift, x_low, x_high):
    """add_pair_products for E2M1 codes: code bits s e1 e0 m moved to a float16's sign (bit 15) and to its two lowest
    exponent bits and first mantissa bit (bits 11..9) make the float16 e2m1 * 2^-14 exactly (e = 0: a subnormal,
    0.5 * 2^-14 for m = 1), both halves of a word at once; the kernel applies the 2^14."""
    pair = words >> shift
    bits = ((pair & 0x00070007) << 9) | ((pair & 0x00080008) << 12)
    low = bits.to(tl.int16).to(tl.float16, bitcast=True)
    high = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    sums = sums + low.to(tl.float32) * x_low[None, :, :]
    return sums + high.to(tl.float32) * x_high[None, :, :]


@triton.jit
def e4m3_times_2_to_8(bits):
    """float8 e4m3 (fn) bits, any integer type, as float32 times 2^-8: its exponent and mantissa moved under a
    float16's (bits 13..7) make the float16 e4m3 * 2^-8 exactly, subnormals included (e4m3's NaN is no scale)."""
    bits = bits.to(tl.int32)
    half = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    return half.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def smooth_part(smooth_ptr, first_col, part_end0, part_end1, K: tl.constexpr):
    """The row of smooth [P, K] for the part of the output channels a program computes: its channels lie in one part
    (the launcher's BLOCK_N divides every part's), the first part ending at channel part_end0, the second at
    part_end1 (N where there are fewer parts)."""
    part = (first_col >= part_end0).to(tl.int32) + (first_col >= part_end1).to(tl.int32)
    return smooth_ptr + part * K


@triton.jit
def int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, b_ptr, y_ptr, N, stride_wn, stride_sn, part_end0, part_end1,
    K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_A_STEP: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr, OFFSET: tl.constexpr = False,
    PTX_DECODE: tl.constexpr = False, E2M1: tl.constexpr = False, STAGES: tl.constexpr = 1,
    BF16_PAIRS: tl.constexpr = False,
):  # fmt: skip
    # E2M1: NVFP4 (GROUP 16): s_ptr the e4m3 scales' bytes, z_ptr the float32 global scales [N], no zero points.
    # BF16_PAIRS (bfloat16 x, 4-byte aligned; ignored with a smooth): x read as 32-bit pairs, each half widened by one shift or
    # one mask (Triton's own widening of a pair's high half costs a PRMT and a shift): a weight's x is widened in every
    # program's every thread, so this is ~0.5 instruction a weight.
    # STAGES > 1: the K loop's loads pipelined that many steps ahead (Triton pipelines a loop without a dot only when
    # told; unpipelined, each step waits out its loads).
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    G: tl.constexpr = GROUPS_A_STEP
    WORDS: tl.constexpr = GROUP // 8  # a group's words
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    smooth_row = smooth_part(smooth_ptr, tl.program_id(0) * BLOCK_N, part_end0, part_end1, K)
    col_ok = cols < N
    w_rows = (w_ptr + cols[:, None].to(tl.int64) * stride_wn).to(tl.pointer_type(tl.int32))  # [BLOCK_N, 1]
    s_rows = s_ptr + cols[:, None].to(tl.int64) * stride_sn
    z_rows = z_ptr + cols[:, None].to(tl.int64) * stride_sn
    word = tl.arange(0, G)[:, None] * WORDS + tl.arange(0, WORDS)[None, :]  # [G, WORDS] within a step
    acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    for g0 in tl.range(0, K // GROUP, G, num_stages=STAGES):
        groups = g0 + tl.arange(0, G)
        group_ok = groups < K // GROUP
        words = tl.load(w_rows[:, :, None] + (g0 * WORDS + word)[None, :, :],
                        mask=col_ok[:, None, None] & group_ok[None, :, None], other=0,
                        eviction_policy="evict_first")  # fmt: skip
        if BF16_PAIRS and not HAS_SMOOTH:  # pair i of a word: columns 2 i (low half) and 2 i + 1, i = 2 h + j1
            kp = (g0 * WORDS + word)[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]  # [G, WORDS, 4]
            pairs = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + kp, mask=group_ok[:, None, None], other=0)
            x_even = tl.reshape((pairs << 16).to(tl.float32, bitcast=True), (G, WORDS, 2, 2))
            x_odd = tl.reshape((pairs & -65536).to(tl.float32, bitcast=True), (G, WORDS, 2, 2))
            x_sum = tl.sum(tl.sum(tl.sum(x_even + x_odd, axis=3), axis=2), axis=1)
        else:
            ks = (g0 * WORDS + word)[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [G, WORDS, 8]
            x = tl.load(x_ptr + ks, mask=group_ok[:, None, None], other=0.0).to(tl.float32)
            if HAS_SMOOTH:  # rounded to x's dtype, as the tensor-core kernels and the reference round it
                x = x * tl.load(smooth_row + ks, mask=group_ok[:, None, None], other=0.0)
                x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
            x_sum = tl.sum(tl.sum(x, axis=2), axis=1)
            # x's column j of each word (j = 4 h + 2 j1 + j0) as [G, WORDS] tensors, by splits of the last axis
            x_even, x_odd = tl.split(tl.reshape(x, (G, WORDS, 2, 2, 2)))  # j0
        x_0l, x_0h, x_1l, x_1h, x_2l, x_2h, x_3l, x_3h = word_columns(x_even, x_odd)
        sums = tl.zeros(words.shape, dtype=tl.float32)
        if E2M1:
            sums = add_pair_products_e2m1(sums, words, 0, x_0l, x_0h)
            sums = add_pair_products_e2m1(sums, words, 4, x_1l, x_1h)
            sums = add_pair_products_e2m1(sums, words, 8, x_2l, x_2h)
            sums = add_pair_products_e2m1(sums, words, 12, x_3l, x_3h)
        else:
            zero = tl.load(z_rows + groups[None, :], mask=col_ok[:, None] & group_ok[None, :], other=0)
            if OFFSET:  # a float offset m (w = q s + m): the codes as they are, m times the group's sum of x below
                zero16 = tl.full((BLOCK_N, G, 1), 1024.0, tl.float16)
            else:
                zero16 = (zero.to(tl.float32) + 1024.0).to(tl.float16)[:, :, None]  # [BLOCK_N, G, 1]
            if PTX_DECODE:
                half = zero16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                zero_pair = half | (half << 16)
                sums = add_pair_products_ptx(sums, words, 0, zero_pair, x_0l, x_0h)
                sums = add_pair_products_ptx(sums, words, 4, zero_pair, x_1l, x_1h)
                sums = add_pair_products_ptx(sums, words, 8, zero_pair, x_2l, x_2h)
                sums = add_pair_products_ptx(sums, words, 12, zero_pair, x_3l, x_3h)
            else:
                sums = add_pair_products(sums, words, 0, zero16, x_0l, x_0h)
                sums = add_pair_products(sums, words, 4, zero16, x_1l, x_1h)
                sums = add_pair_products(sums, words, 8, zero16, x_2l, x_2h)
                sums = add_pair_products(sums, words, 12, zero16, x_3l, x_3h)
        scale = tl.load(s_rows + groups[None, :], mask=col_ok[:, None] & group_ok[None, :], other=0)
        if E2M1:
            scale = e4m3_times_2_to_8(scale)
        acc += tl.sum(sums, axis=2) * scale.to(tl.float32)
        if OFFSET:
            acc += zero.to(tl.float32) * x_sum[None, :]
    out = tl.sum(acc, axis=1)
    if E2M1:  # the codes' 2^-14 and the scales' 2^-8 undone with the channels' global scales
        out *= tl.load(z_ptr + cols, mask=col_ok, other=0.0) * 4194304.0
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def gemm_tile(x_ptr, w_ptr, smooth_ptr, M, N, stride_xm, stride_wn, part_end0, part_end1, K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    """What the 4-bit GEMMs' programs start from: their rows and output channels (and which are in range), x's and the
    packed codes' rows, and the smooth row of their channels' part; after PDL's wait, where it is on."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    smooth_row = smooth_part(smooth_ptr, tl.program_id(1) * BLOCK_N, part_end0, part_end1, K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    return rows, cols, rows < M, cols < N, x_rows, w_rows, smooth_row


@triton.jit
def nibbles_minus_zero(nibbles, zero, OFFSET: tl.constexpr, dtype: tl.constexpr):
    """q - z (or q, with OFFSET) of 4-bit codes in `dtype`, exactly, without an integer-to-float conversion: the code
    or-ed under a 16-bit float's exponent (0x4300: bfloat16 128 + q; 0x6400: float16 1024 + q), then 128 + z or 1024 + z
    taken away (all small integers, exact)."""
    if dtype == tl.bfloat16:
        value = (nibbles.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
        bias: tl.constexpr = 128.0
    elif dtype == tl.float16:
        value = (nibbles.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        bias: tl.constexpr = 1024.0
    else:
        value = nibbles.to(tl.float32)
        bias: tl.constexpr = 0.0
    if OFFSET:
        return value - bias
    return value - (zero.to(tl.float32) + bias).to(dtype)[:, None]


@triton.jit
def int4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_ym, part_end0,
    part_end1, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr, OFFSET: tl.constexpr = False,
    CODES8: tl.constexpr = False, SPLIT_NIBBLES: tl.constexpr = False,
):  # fmt: skip
    # CODES8: int8_weight_linear's signed 8-bit codes, a byte a weight (w_ptr int8 [N, K]), no zero points (z_ptr: the
    # offsets where OFFSET). SPLIT_NIBBLES: the low nibbles (even columns) and the high ones (odd columns) as two dots
    # over x's even and odd columns, decoded by nibbles_minus_zero: no interleaving shuffle, no int-to-float.
    rows, cols, row_ok, col_ok, x_rows, w_rows, smooth_row = gemm_tile(
        x_ptr, w_ptr, smooth_ptr, M, N, stride_xm, stride_wn, part_end0, part_end1, K, BLOCK_M, BLOCK_N, USE_PDL
    )
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_NIBBLES:
        for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP, which divides K
            even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            x_low = tl.load(x_rows + even[None, :], mask=row_ok[:, None], other=0.0)
            x_high = tl.load(x_rows + even[None, :] + 1, mask=row_ok[:, None], other=0.0)
            if HAS_SMOOTH:
                x_low = (x_low.to(tl.float32) * tl.load(smooth_row + even)[None, :]).to(dtype)
                x_high = (x_high.to(tl.float32) * tl.load(smooth_row + even + 1)[None, :]).to(dtype)
            packed = tl.load(w_rows + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=col_ok[:, None], other=0)
            group = k0 // GROUP
            zero = tl.load(z_ptr + cols * stride_sn + group, mask=col_ok, other=0)
            w_low = nibbles_minus_zero(packed & 15, zero, OFFSET, dtype)
            w_high = nibbles_minus_zero(packed >> 4, zero, OFFSET, dtype)
            if dtype == tl.float32:
                part = tl.dot(x_low, tl.trans(w_low), input_precision="ieee")
                part += tl.dot(x_high, tl.trans(w_high), input_precision="ieee")
            else:
                part = tl.dot(x_low, tl.trans(w_low))
                part += tl.dot(x_high, tl.trans(w_high))
            scale = tl.load(s_ptr + cols * stride_sn + group, mask=col_ok, other=0.0).to(tl.float32)
            acc += part * scale[None, :]
            if OFFSET:
                x_sum = tl.sum(x_low.to(tl.float32), axis=1) + tl.sum(x_high.to(tl.float32), axis=1)
                acc += x_sum[:, None] * zero.to(tl.float32)[None, :]
    for k0 in range(0, K if not SPLIT_NIBBLES else 0, BLOCK_K):  # BLOCK_K divides GROUP, which divides K
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_SMOOTH:
            x = (x.to(tl.float32) * tl.load(smooth_row + ks)[None, :]).to(dtype)
        if CODES8:
            codes = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0)
        else:
            packed = tl.load(w_rows + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=col_ok[:, None], other=0)
            codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))  # columns 2j, 2j + 1
        group = k0 // GROUP
        if CODES8 and not OFFSET:
            zero = 0
        else:
            zero = tl.load(z_ptr + cols * stride_sn + group, mask=col_ok, other=0)
        if OFFSET or CODES8:  # w = q s (+ m): q exact in the dot, m times the block's sums of x
            w = codes.to(dtype)
        else:
            w = (codes.to(tl.int32) - zero.to(tl.int32)[:, None]).to(dtype)  # q - z, exact
        if dtype == tl.float32:
            part = tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w))
        scale = tl.load(s_ptr + cols * stride_sn + group, mask=col_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :]
        if OFFSET:  # BLOCK_K divides the group: the blocks' sums of x add up to the group's
            acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * zero.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def nvfp4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, smooth_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_ym, part_end0,
    part_end1, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """y = x @ (e2m1 * s)^T * g on tensor cores: a tile of codes and its scales (s_ptr: the e4m3 bytes, one per 16
    columns) decoded in registers to e2m1 * s, exact in x's dtype, and the channels' global scales (g_ptr) applied
    to the float32 sums."""
    rows, cols, row_ok, col_ok, x_rows, w_rows, smooth_row = gemm_tile(
        x_ptr, w_ptr, smooth_ptr, M, N, stride_xm, stride_wn, part_end0, part_end1, K, BLOCK_M, BLOCK_N, USE_PDL
    )
    dtype = x_ptr.dtype.element_ty
    s_rows = s_ptr + cols[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides K
        x = tl.load(x_rows + k0 + tl.arange(0, BLOCK_K)[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_SMOOTH:
            x = (x.to(tl.float32) * tl.load(smooth_row + k0 + tl.arange(0, BLOCK_K))[None, :]).to(dtype)
        packed = tl.load(w_rows + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=col_ok[:, None], other=0)
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K)).to(tl.int32)  # columns 2j, 2j + 1
        bits = ((codes & 7) << 9) | ((codes & 8) << 12)
        values = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)  # e2m1 * 2^-14
        scale = e4m3_times_2_to_8(tl.load(s_rows + k0 // 16 + tl.arange(0, BLOCK_K // 16)[None, :], mask=col_ok[:, None],
                                          other=0))  # fmt: skip
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // 16, 16)), (BLOCK_N, BLOCK_K))
        w = (values * scale * 4194304.0).to(dtype)  # e2m1 * s, exact
        if dtype == tl.float32:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    acc *= tl.load(g_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip
