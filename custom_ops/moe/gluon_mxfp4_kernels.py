"""One token's MXFP4 expert GEMMs on tensor cores, in Gluon: gluon_mxfp4.py launches it.

A decode step of one sequence gives each of its k experts one row of x, so the one-token GEMV
(triton_one_token_kernels.one_token_gemv_kernel) does a multiply-add a weight on the CUDA cores besides the decode, and
its loop issues ~5.7 instructions a weight: it reads 1.1-1.3 TB/s (BENCHMARKS.md). Here, as in
custom_ops/linear/gluon_int4_kernels.py's NVFP4 decode, the expert's weights are the 16-row side of mma.m16n8k16 and
x the 8-column side: the threads only decode, each its code bytes loaded straight in the A operand's layout, and the
MMA does the products. The decode is that kernel's (e2m1_decode_asm, its scale pair set so that a code becomes its
e2m1 value, exact in bfloat16 and float16; x read in the same permutation of K, e2m1_order); MXFP4's scale, one e8m0
exponent a 32-column group, multiplies the group's float32 sums by 2^(s - 127): a step is one group. The products
and sums are float32's, so the result is the reference's (the dequantized weights times x) up to the order of the
sums.

A program computes ROWS output channels of one pair (token, expert); its SPLIT warps take a slice of K each, and the
slices' sums are added at the end. The raw float32 sums go to y [pairs, N]; the epilogue (bias, activation,
routing weight, roundings) is triton_one_token_kernels.one_token_epilogue_kernel's, as the GEMV computes it.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from custom_ops.linear.gluon_int4_decode import decode_e2m1, e2m1_order
from custom_ops.linear.gluon_int4_kernels import (
    a_operand,
    launch_dependents,
    mma_layout,
    operand_layout,
    wait_for_producers,
)

GROUP = gl.constexpr(32)  # MXFP4's columns an exponent: one step
COLS = gl.constexpr(8)  # the MMA's column side: x's one row and 7 zero columns
# The decode's scale pair (e2m1_decode_asm's $5, s * 2^119 in bfloat16 and s * 2^7 in float16, both halves) for
# s = 2^7: 2^126 (bfloat16) and 2^14 (float16), so that the decoded value is the code's e2m1 value itself, exact.
E2M1_PAIR_BF16 = gl.constexpr(0x7E807E80)
E2M1_PAIR_FP16 = gl.constexpr(0x74007400)


@gluon.jit
def group_scale(exponent):
    """e8m0 exponents s (uint8) as 2^(s - 127) in float32, exactly for every s: the bits s << 23, and 2^-127's
    (a subnormal) for s = 0; s = 255 (e8m0's NaN) gives +inf."""
    bits = exponent.to(gl.int32) << 23
    return gl.where(bits == 0, 0x00400000, bits).to(gl.float32, bitcast=True)


@gluon.jit
def mxfp4_experts_mma_kernel(
    x_ptr, w_ptr, e_ptr, ids_ptr, y_ptr, N, top_k, num_experts, stride_xm, stride_we, stride_wn, stride_ee,
    stride_en, stride_ym,
    K: gl.constexpr, ROWS: gl.constexpr, SPLIT: gl.constexpr, UNROLL: gl.constexpr, A_PER_TOKEN: gl.constexpr,
    USE_PDL: gl.constexpr,
):  # fmt: skip
    """y[p, n] (float32) = x[p // top_k if A_PER_TOKEN else p] . W[ids[p], n] for the program's pair p and ROWS
    channels n: w_ptr the MXFP4 bytes [E, N, K / 2] (column 2h in byte h's low nibble), e_ptr their exponents [E, N,
    K / 32]. A pair whose expert is outside [0, num_experts) (another rank's) gets zeros. The launcher checks that ROWS
    divides N and that SPLIT * UNROLL divides K's groups. A 1-D grid: program i is pair i // (N / ROWS)."""
    if USE_PDL:
        launch_dependents()
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    mma: gl.constexpr = mma_layout(SPLIT)
    a_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 0, False)
    b_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 1, False)
    codes_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 0, True)
    GROUPS: gl.constexpr = K // GROUP // SPLIT  # a warp's groups
    SLICE: gl.constexpr = GROUPS * GROUP  # a warp's columns
    tiles = N // ROWS
    pair = gl.program_id(0) // tiles
    n0 = (gl.program_id(0) % tiles) * ROWS
    if USE_PDL:  # the ids, and x, are earlier kernels' outputs (the router's, the activation's)
        wait_for_producers()
    expert = gl.load(ids_ptr + pair).to(gl.int64)
    valid = (expert >= 0) & (expert < num_experts)
    # Another rank's expert: the program reads expert 0's first rows (the same few KB for every such program, from
    # L2: no mask a load, and no stream of a whole expert) and stores zeros.
    expert = gl.where(valid, expert, 0)
    n_read = gl.where(valid, n0, 0)
    a_row = pair // top_k if A_PER_TOKEN else pair

    # code bytes [SPLIT, ROWS, GROUP / 2] of a step (4 a thread and row: 8 consecutive columns)
    c_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, codes_layout)))
    c_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, codes_layout)))
    c_byte = gl.arange(0, GROUP // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, codes_layout)))
    codes_at = (w_ptr + expert * stride_we + (n_read + c_row)[None, :, None] * stride_wn
                + (c_split * (SLICE // 2))[:, None, None] + c_byte[None, None, :])  # fmt: skip
    # x [SPLIT, GROUP, COLS] of a step: the row in column 0, zeros in the others
    x_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, b_layout)))
    x_col = gl.arange(0, GROUP, layout=gl.SliceLayout(0, gl.SliceLayout(2, b_layout)))
    x_row = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(1, b_layout)))
    x_at = (x_ptr + a_row * stride_xm + (x_split * SLICE)[:, None, None] + x_col[None, :, None]
            + 0 * x_row[None, None, :])  # fmt: skip
    x_ok = (x_row == 0)[None, None, :]
    # exponents [SPLIT, ROWS] of a step, in the accumulator's layout
    s_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, mma)))
    s_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma)))
    e_at = e_ptr + expert * stride_ee + (n_read + s_row)[None, :] * stride_en + (s_split * GROUPS)[:, None]

    if dtype == gl.bfloat16:
        pairs = gl.full([SPLIT, ROWS, GROUP // 2], E2M1_PAIR_BF16, gl.int32, layout=codes_layout)
    else:
        pairs = gl.full([SPLIT, ROWS, GROUP // 2], E2M1_PAIR_FP16, gl.int32, layout=codes_layout)
    acc = gl.zeros([SPLIT, ROWS, COLS], gl.float32, layout=mma)
    for first in range(0, GROUPS, UNROLL):
        for u in gl.static_range(UNROLL):
            step = first + u
            x = gl.load(x_at + step * GROUP, mask=x_ok, other=0.0)
            x = gl.convert_layout(e2m1_order(x, SPLIT, GROUP, COLS), b_layout)
            first4, last4 = decode_e2m1(gl.load(codes_at + step * (GROUP // 2)), pairs, dtype)
            sums = mma_v2(a_operand(first4, last4, a_layout, SPLIT, ROWS, GROUP), x,
                          gl.zeros([SPLIT, ROWS, COLS], gl.float32, layout=mma))  # fmt: skip
            acc += sums * group_scale(gl.load(e_at + step))[:, :, None]
    out = gl.sum(acc, axis=0)  # [ROWS, COLS]: the warps' slices added
    o_row = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(0, mma)))
    o_col = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(0, mma)))
    out = gl.where(valid, out, 0.0)
    gl.store(y_ptr + pair * stride_ym + (n0 + o_row)[:, None] + 0 * o_col[None, :], out, mask=(o_col == 0)[None, :])
