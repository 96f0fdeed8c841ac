"""int4_linear's and nvfp4_linear's decode on tensor cores, in Gluon (Triton's language with explicit layouts):
gluon_int4.py launches it.

For up to 16 rows of x (a decode batch), the weights are the 16-row side of mma.m16n8k16 and x the 8-column side, so
the MMA does the multiply-adds and the threads only decode. Each thread loads its packed codes straight in the A
operand's register layout (16 bytes: 32 columns of a row), and inline PTX turns each byte into the bfloat16 (or
float16) pair (q0 - z, q1 - z) in 3.25 instructions (decode_asm: a shift a word, then a prmt, a lop3 and an fma a
byte). The decoded registers are the A operand as they are (`convert_layout(..., assert_trivial=True)` proves no
data moves), so one row takes 2.3-2.7 instructions a weight, the whole kernel counted (benchmarks/kernel_sass.py
int4-mma), against 5.9-6.9 in the CUDA-core GEMV's loop. One row of x (times AWQ's smooth) is staged in shared memory
for the whole K before the steps, a column computed once, and the steps are unrolled with no barrier between them;
more rows are read in the B operand's layout each step.

A one-row GEMV of 4096 channels would give too few programs of 16 rows, so the K axis is split over the program's
warps: the MMA's batch axis is the split (a warp per slice of K, with its own x), and the warps' partial sums are
added once at the end. Numerics are int4.py's: q - z exact, the group's float32 sum scaled in float32; float offsets
(w = q s + m) add m times the group's sum of x: one row sums its staged row once and adds every group's m times its
sum after the steps (its offsets loaded before the wait for the previous kernel); more rows compute the sums each step
with an MMA of ones over x, in the accumulator's layout. (The MMA of ones at one row repeated for every 16 channels of
a program: +50% HMMA, gate/up 33.7 against 31.5 us, down 26.6 against 18.3 on an H100.)

NVFP4 (E2M1) runs the same kernel: each code becomes e2m1 * s * 2^-7, exact in bfloat16 and float16 (e2m1_decode_asm:
its bits placed as a small float, times its block's scale pair), so the MMA sums whole steps and the global scale
(times 2^7) scales the channel's sum once. The decode writes a register's two values from columns j and j + 4, so x
is read in that order of K too (e2m1_order). 3.2-4.0 instructions a weight (benchmarks/kernel_sass.py nvfp4-mma).

Importing this module needs triton with Gluon (3.5+). Gluon kernels do not run in Triton's interpreter, so the CPU
tests (tests/test_int4_mma.py, test_nvfp4_mma.py) check the decodes' PTX against the codes' values, compile the
kernel for sm_90a and run its whole PTX in tests/ptx_emulator.py against the reference; the GPU tests hold it to the
reference there.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


def decode_asm(dtype: str) -> str:
    """PTX of one inline-asm call (pack=4): the 4 code bytes in $4, the zero point's addend in $5 (of $5-$8: the addend
    tensor is int32, 4 registers a call), -(128 + z) in bfloat16 or -(1024 + z) in float16 in both halves; out:
    columns 0-3 of the 8 in $0, $1 (first output) and 4-7 in $2, $3 (second), a register a pair (even column low).
    The word shifted by 4 holds each byte's high nibble as its low one; prmt takes byte b's low half from the word and
    its high half from the shifted word, lop3 ((a & b) | c: 0xEA) keeps the nibbles under an exponent that makes them
    128 + q (bfloat16) or 1024 + q (float16), exact, and one fma adds the addend to both: q0 - z, q1 - z. (A single
    prmt of the byte into both halves does not do: bfloat16's 7 mantissa bits cannot hold a nibble at bits 4-7.)"""
    exponents, one, fma = {
        "bf16": ("0x43004300", "0x3F803F80", "fma.rn.bf16x2"),
        "fp16": ("0x64006400", "0x3C003C00", "fma.rn.f16x2"),
    }[dtype]
    lines = ["{", ".reg .b32 t, h, one;", f"mov.b32 one, {one};", "shr.b32 h, $4, 4;"]
    for b in range(4):
        lines += [f"prmt.b32 t, $4, h, 0x{4 + b}{4 + b}{b}{b};", f"lop3.b32 t, t, 0x000F000F, {exponents}, 0xEA;",
                  f"{fma} ${b}, t, one, $5;"]  # fmt: skip
    return "\n".join([*lines, "}"])


def e2m1_decode_asm(dtype: str) -> str:
    """PTX of one inline-asm call (pack=4) of NVFP4's decode: the 4 code bytes (columns 0-7, column i at bits 4i) in
    $4, their block's scale pair in $5 (of $5-$8): s * 2^119 in bfloat16 or s * 2^7 in float16, in both halves. Out:
    (column j, column j + 4) in register $j, each as e2m1 * s * 2^-7, exact (at most 6 significant bits, 2^-17 to 21):
    the MMA reads a register as two neighbouring columns of K, so the kernel orders K so (e2m1_order).
    The word shifted left by 12 - 4 j has column j's code at the top of the low half and column j + 4's at the top of
    the high one: the sign stays at bit 15 (31), the 3 bits of exponent and mantissa go down to bits 6-8 (bfloat16) or
    9-11 (float16), which makes the half e2m1 * 2^-126 (bfloat16, a subnormal for codes under 1) or e2m1 * 2^-14
    (float16); one multiply by the scale pair (an fma adding -0, which keeps a product's sign) does the rest."""
    mask, shift, fma = {
        "bf16": ("0x01C001C0", 6, "fma.rn.bf16x2"),
        "fp16": ("0x0E000E00", 3, "fma.rn.f16x2"),
    }[dtype]
    lines = ["{", ".reg .b32 u, t, z;", "mov.b32 z, 0x80008000;"]
    for j in range(4):
        lines += [f"shl.b32 u, $4, {12 - 4 * j};", f"shr.b32 t, u, {shift};", f"and.b32 t, t, {mask};",
                  "lop3.b32 t, u, 0x80008000, t, 0xEA;", f"{fma} ${j}, t, $5, z;"]  # fmt: skip
    return "\n".join([*lines, "}"])


DECODE_BF16 = gl.constexpr(decode_asm("bf16"))
DECODE_FP16 = gl.constexpr(decode_asm("fp16"))
def e2m1_scales_asm(dtype: str) -> str:
    """PTX of one inline-asm call (pack=4) making e2m1_decode_asm's $5 from 4 e4m3 scale bytes ($4): each scale s as
    s * 2^119 (bfloat16) or s * 2^7 (float16) in both halves of $0-$3, in the bytes' order. Two conversions of two
    e4m3 to float16 each (exact: every e4m3 value is a normal float16, or 0); float16 scales times 2^7 in one multiply
    (at most 57344), bfloat16 ones through float32 (2^119 is past float16's range); then each half in both halves."""
    lines = ["{", ".reg .b16 lo, hi, h0, h1, h2, h3;", ".reg .b32 a, b;", "mov.b32 {lo, hi}, $4;",
             "cvt.rn.f16x2.e4m3x2 a, lo;", "cvt.rn.f16x2.e4m3x2 b, hi;"]  # fmt: skip
    if dtype == "fp16":
        lines += [".reg .b32 c;", "mov.b32 c, 0x58005800;", "mul.rn.f16x2 a, a, c;", "mul.rn.f16x2 b, b, c;"]  # 128
    else:
        lines += [".reg .f32 f0, f1, f2, f3;", "mov.b32 {h0, h1}, a;", "mov.b32 {h2, h3}, b;"]
        lines += [f"cvt.f32.f16 f{i}, h{i};" for i in range(4)]
        lines += [f"mul.rn.f32 f{i}, f{i}, 0f7B000000;" for i in range(4)]  # 2^119
        lines += ["cvt.rn.bf16x2.f32 a, f1, f0;", "cvt.rn.bf16x2.f32 b, f3, f2;"]
    lines += ["prmt.b32 $0, a, 0, 0x1010;", "prmt.b32 $1, a, 0, 0x3232;", "prmt.b32 $2, b, 0, 0x1010;",
              "prmt.b32 $3, b, 0, 0x3232;"]  # fmt: skip
    return "\n".join([*lines, "}"])


DECODE_E2M1_BF16 = gl.constexpr(e2m1_decode_asm("bf16"))
DECODE_E2M1_FP16 = gl.constexpr(e2m1_decode_asm("fp16"))
E2M1_SCALES_BF16 = gl.constexpr(e2m1_scales_asm("bf16"))
E2M1_SCALES_FP16 = gl.constexpr(e2m1_scales_asm("fp16"))


@gluon.constexpr_function
def mma_layout(split):
    """The accumulator's: mma.m16n8k16 tiles, the batch axis (K's slices) over the warps."""
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[split, 1, 1], instr_shape=[1, 16, 8])


@gluon.constexpr_function
def operand_layout(split, group, index, packed):
    """The MMA's operand `index` (0: weights, 1: x), of 16-bit values or, `packed`, of the code bytes (two columns
    each). K-width: 32 columns a thread (a group spans a row's 4 threads), fewer for groups under 128."""
    columns = 32 if group >= 128 else group // 4
    return gl.DotOperandLayout(
        operand_index=index, parent=mma_layout(split), k_width=columns // 2 if packed else columns
    )


@gluon.constexpr_function
def power_of_2_at_least(value):
    return 1 << (value - 1).bit_length()


@gluon.jit
def _half_bits(value, dtype: gl.constexpr):
    """A float32 tensor rounded to `dtype` (16 bits), its bits in an int32's low half."""
    return value.to(dtype).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF


@gluon.jit
def zero_addend(zero, dtype: gl.constexpr):
    """decode_asm's $5 for float32 zero points: -(128 + z) in bfloat16, -(1024 + z) in float16, in both halves. Exact
    for the 4-bit zero points int4_linear stores (0-15; bfloat16 holds -(128 + z) exactly up to z = 127)."""
    if dtype == gl.bfloat16:
        half = _half_bits(-128.0 - zero, dtype)
    else:
        half = _half_bits(-1024.0 - zero, dtype)
    return half | (half << 16)


@gluon.jit
def run_decode(asm_bf16: gl.constexpr, asm_fp16: gl.constexpr, packed, operand, dtype: gl.constexpr):
    """A decode's inline asm (pack=4: 4 code bytes and their int32 operand a call) for `dtype`: its two outputs."""
    if dtype == gl.bfloat16:
        return gl.inline_asm_elementwise(asm_bf16, "=r,=r,=r,=r,r,r,r,r,r", [packed, operand],
                                         dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)  # fmt: skip
    else:
        return gl.inline_asm_elementwise(asm_fp16, "=r,=r,=r,=r,r,r,r,r,r", [packed, operand],
                                         dtype=(gl.float16, gl.float16), is_pure=True, pack=4)  # fmt: skip


@gluon.jit
def decode_codes(packed, addend, dtype: gl.constexpr):
    """(columns 8 g + i, columns 8 g + 4 + i) at [4 g + i] of each 8-column chunk, as q - z in `dtype`."""
    return run_decode(DECODE_BF16, DECODE_FP16, packed, addend, dtype)


@gluon.jit
def e2m1_order(x, before: gl.constexpr, columns: gl.constexpr, after: gl.constexpr):
    """x [before, columns, after] with its columns in the order NVFP4's decode writes its registers: in each chunk of
    8, 0 4 1 5 2 6 3 7 (a dot is invariant to a permutation of K that its two operands share). A permute of the
    layout's bases: no data moves unless a consumer wants another layout."""
    x = x.reshape([before, columns // 8, 2, 4, after]).permute(0, 1, 3, 2, 4)
    return x.reshape([before, columns, after])


@gluon.jit
def decode_e2m1(packed, scale_pairs, dtype: gl.constexpr):
    """e2m1_decode_asm's two outputs: (columns j, j + 4) of each 8-column chunk at [4 g + 2 j], [4 g + 2 j + 1] of the
    first (j = 0, 1) and the second (j = 2, 3): e2m1_order's columns 8 g + 0-3 and 8 g + 4-7."""
    return run_decode(DECODE_E2M1_BF16, DECODE_E2M1_FP16, packed, scale_pairs, dtype)


@gluon.jit
def e2m1_scale_pairs(scales, dtype: gl.constexpr, GROUP: gl.constexpr):
    """e4m3 scale bytes -> e2m1_decode_asm's $5: s * 2^119 (bfloat16) or s * 2^7 (float16) in both halves of an int32.
    Steps of 128 columns (a thread's 4 scales: two rows, two blocks): e2m1_scales_asm, 4 instructions a scale. Else
    the byte's bits placed in a float16 make s * 2^-8, exact for every e4m3 value, subnormals included."""
    if GROUP == 128:
        if dtype == gl.bfloat16:
            return gl.inline_asm_elementwise(E2M1_SCALES_BF16, "=r,=r,=r,=r,r", [scales], dtype=gl.int32,
                                             is_pure=True, pack=4)  # fmt: skip
        else:
            return gl.inline_asm_elementwise(E2M1_SCALES_FP16, "=r,=r,=r,=r,r", [scales], dtype=gl.int32,
                                             is_pure=True, pack=4)  # fmt: skip
    bits = scales.to(gl.int32)
    half = (((bits & 0x7F) << 7) | ((bits & 0x80) << 8)).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    if dtype == gl.bfloat16:
        pair = _half_bits(half * 1.7014118346046923e38, dtype)  # 2^127
    else:
        pair = _half_bits(half * 32768.0, dtype)
    return pair | (pair << 16)


@gluon.jit
def add_e2m1_step(acc, x, step, packed, block_scales_at, fill, a_layout: gl.constexpr, SPLIT: gl.constexpr,
                  ROWS: gl.constexpr, GROUP: gl.constexpr):  # fmt: skip
    """acc + step `step` (GROUP columns) of each warp's slice in NVFP4: its codes decoded to e2m1 * s * 2^-7 with their
    blocks' scales, times x [SPLIT, GROUP, COLS] (in e2m1_order) on the tensor cores (the global scale and 2^7 come at
    the end)."""
    dtype: gl.constexpr = x.dtype
    pairs = e2m1_scale_pairs(gl.load(block_scales_at + step * (GROUP // 16)), dtype, GROUP)  # [SPLIT, ROWS, GROUP/16]
    # a block's pair beside each of its 8 code bytes: the same registers, in the codes' layout (no data moves)
    pairs = (pairs[:, :, :, None] + fill.reshape([SPLIT, ROWS, GROUP // 16, 8])).reshape([SPLIT, ROWS, GROUP // 2])
    pairs = gl.convert_layout(pairs, fill.type.layout, assert_trivial=True)
    first, second = decode_e2m1(packed, pairs, dtype)
    # first[4 g + i] is position 8 g + i of e2m1_order's K, second[4 g + i] position 8 g + 4 + i (x's order)
    return mma_v2(a_operand(first, second, a_layout, SPLIT, ROWS, GROUP), x, acc)


@gluon.jit
def a_operand(first, second, a_layout: gl.constexpr, SPLIT: gl.constexpr, ROWS: gl.constexpr, GROUP: gl.constexpr):
    """A decode's two outputs as the MMA's weights [SPLIT, ROWS, GROUP]: first[4 g + i] is K's position 8 g + i,
    second[4 g + i] 8 g + 4 + i; the registers as they are (assert_trivial: no data moves)."""
    w = gl.join(first, second).reshape([SPLIT, ROWS, GROUP // 8, 4, 2]).permute(0, 1, 2, 4, 3)
    return gl.convert_layout(w.reshape([SPLIT, ROWS, GROUP]), a_layout, assert_trivial=True)


@gluon.jit
def add_any_step(acc, x, step, packed, zeros_at, scales_at, offsets_at, block_scales_at, code_addend, ones, fill,
                 a_layout: gl.constexpr, mma: gl.constexpr, SPLIT: gl.constexpr, ROWS: gl.constexpr,
                 COLS: gl.constexpr, GROUP: gl.constexpr, OFFSET: gl.constexpr, OFFSET_SUMS: gl.constexpr,
                 E2M1: gl.constexpr):  # fmt: skip
    """add_e2m1_step (E2M1, x already in e2m1_order) or add_step, over the step's codes `packed`."""
    if E2M1:
        return add_e2m1_step(acc, x, step, packed, block_scales_at, fill, a_layout, SPLIT, ROWS, GROUP)
    else:
        return add_step(acc, x, step, packed, zeros_at, scales_at, offsets_at, code_addend, ones, fill, a_layout, mma,
                        SPLIT, ROWS, COLS, GROUP, OFFSET, OFFSET_SUMS)  # fmt: skip


@gluon.jit
def prefetch_codes(w_ptr, n0, stride_wn, SPLIT: gl.constexpr, ROWS: gl.constexpr, BYTES: gl.constexpr):
    """A bulk L2 prefetch (sm_90) of each warp's slice of each of the program's rows: BYTES bytes from w_ptr +
    (n0 + row) * stride_wn + split * BYTES, 16-byte aligned and a multiple of 16 (the launcher's checks)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [SPLIT, 1], [1, 0])
    split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, layout))
    row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, layout))
    starts = w_ptr + (n0 + row)[None, :] * stride_wn + (split * BYTES)[:, None]
    sizes = gl.full([SPLIT, ROWS], BYTES, gl.int32, layout=layout)
    gl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0;", "=r,l,r", [starts, sizes],
                              dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def add_step(acc, x, step, packed, zeros_at, scales_at, offsets_at, code_addend, ones, fill, a_layout: gl.constexpr,
             mma: gl.constexpr, SPLIT: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr, GROUP: gl.constexpr,
             OFFSET: gl.constexpr, OFFSET_SUMS: gl.constexpr):  # fmt: skip
    """acc + group `step` of each warp's slice: its codes `packed` decoded, times x [SPLIT, GROUP, COLS] (the B operand) on
    the tensor cores, times the group's scales (OFFSET: the codes as they are, and with OFFSET_SUMS plus the group's
    offsets times x's sums, an MMA of ones over x)."""
    dtype: gl.constexpr = x.dtype
    if OFFSET:
        addend = code_addend
    else:
        addend = zero_addend(gl.load(zeros_at + step).to(gl.float32), dtype)[:, :, None] + fill
    first4, last4 = decode_codes(packed, addend, dtype)  # columns 8 g + i and 8 g + 4 + i of the step at [4 g + i]
    sums = mma_v2(a_operand(first4, last4, a_layout, SPLIT, ROWS, GROUP), x, gl.zeros([SPLIT, ROWS, COLS], gl.float32,
                                                                                       layout=mma))  # fmt: skip
    acc += sums * gl.load(scales_at + step).to(gl.float32)[:, :, None]
    if OFFSET_SUMS:
        x_sums = mma_v2(ones, x, gl.zeros([SPLIT, ROWS, COLS], gl.float32, layout=mma))
        acc += x_sums * gl.load(offsets_at + step).to(gl.float32)[:, :, None]
    return acc


@gluon.jit
def launch_dependents():
    """PDL: the next kernel may launch now (it waits for this one's results itself, wait_for_producers)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)  # fmt: skip


@gluon.jit
def wait_for_producers():
    """PDL: wait until the kernels this one depends on have finished, their writes visible."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def int4_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, part_end0, part_end1,
    K: gl.constexpr, GROUP: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr, SPLIT: gl.constexpr,
    UNROLL: gl.constexpr, ONE_ROW: gl.constexpr, HAS_SMOOTH: gl.constexpr, HAS_BIAS: gl.constexpr, OFFSET: gl.constexpr,
    USE_PDL: gl.constexpr, E2M1: gl.constexpr = False, PREFETCH: gl.constexpr = False, PRELOAD: gl.constexpr = 0,
):  # fmt: skip
    """y [M, N] = x [M, K] @ W^T for M <= COLS (8 or 16): a program computes ROWS channels, its SPLIT warps a slice of
    K / SPLIT columns each, GROUP columns (one group) a step, UNROLL steps a loop iteration (ONE_ROW: every step
    unrolled). The launcher checks that ROWS divides N and each smooth part, and that SPLIT * UNROLL groups divide
    K's. E2M1: NVFP4's codes (nvfp4.py), s_ptr its e4m3 scales [N, K / 16] (as bytes), z_ptr its global scales [N];
    GROUP is then only the columns of a step. PREFETCH: the program's codes prefetched into L2 first (the launcher
    checks that the codes' base and row stride are multiples of 16 bytes). PRELOAD (ONE_ROW): the codes of the first
    PRELOAD steps loaded into registers before the wait, as the bf16 GEMV loads its first weights (the launcher keeps
    it within the warp's steps)."""
    if USE_PDL:
        launch_dependents()
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    # Batch axis = the K split (a warp each); K-width 32: a thread's 16 bytes of codes are 32 consecutive columns
    # (one 128-bit load), and the A and B operands agree on that permutation of K, which a dot is invariant to.
    mma: gl.constexpr = mma_layout(SPLIT)
    a_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 0, False)
    b_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 1, False)
    codes_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 0, True)
    GROUPS: gl.constexpr = K // GROUP // SPLIT  # a warp's groups
    SLICE: gl.constexpr = GROUPS * GROUP  # a warp's columns
    n0 = gl.program_id(0) * ROWS

    # codes [SPLIT, ROWS, GROUP / 2] of a step, and their rows' zero points [SPLIT, ROWS]
    c_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, codes_layout)))
    c_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, codes_layout)))
    c_byte = gl.arange(0, GROUP // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, codes_layout)))
    codes_at = (w_ptr + (n0 + c_row)[None, :, None] * stride_wn + (c_split * (SLICE // 2))[:, None, None]
                + c_byte[None, None, :])  # fmt: skip
    zeros_at = z_ptr + (n0 + c_row)[None, :] * stride_sn + (c_split * GROUPS)[:, None]
    # x [SPLIT, GROUP, COLS] of a step (its rows are the MMA's columns)
    x_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, b_layout)))
    x_col = gl.arange(0, GROUP, layout=gl.SliceLayout(0, gl.SliceLayout(2, b_layout)))
    x_row = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(1, b_layout)))
    k_of_x = (x_split * SLICE)[:, None, None] + x_col[None, :, None]
    x_at = x_ptr + k_of_x + x_row[None, None, :] * stride_xm
    x_ok = (x_row < M)[None, None, :]
    if HAS_SMOOTH:  # the program's channels lie in one part (the launcher's ROWS divides every part's)
        part = (n0 >= part_end0).to(gl.int32) + (n0 >= part_end1).to(gl.int32)
        smooth_at = smooth_ptr + part * K + k_of_x
    # scales (and float offsets) [SPLIT, ROWS] in the accumulator's layout
    s_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, mma)))
    s_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma)))
    scales_at = (n0 + s_row)[None, :] * stride_sn + (s_split * GROUPS)[:, None]

    fill = gl.zeros([SPLIT, ROWS, GROUP // 2], gl.int32, layout=codes_layout)  # broadcasts a row's addend
    block_scales_at = s_ptr  # E2M1: the scales [SPLIT, ROWS, GROUP / 16] of a step, a block's beside its code bytes
    if E2M1:
        blocks: gl.constexpr = gl.SliceLayout(3, fill.reshape([SPLIT, ROWS, GROUP // 16, 8]).type.layout)
        b_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, blocks)))
        b_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, blocks)))
        b_block = gl.arange(0, GROUP // 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, blocks)))
        block_scales_at = (s_ptr + (n0 + b_row)[None, :, None] * stride_sn + (b_split * (SLICE // 16))[:, None, None]
                           + b_block[None, None, :])  # fmt: skip
    code_addend, ones = fill, fill  # what the offsets' form uses, else unused
    # w = q s + m: the codes as they are (z = 0), m times the group's sum of x. One row sums its staged row once and
    # adds every group's m times its sum after the steps (ONE_ROW_OFFSETS, a warp's offsets [SPLIT, ROWS, GROUPS]
    # loaded before the wait: they are weights); more rows sum x with an MMA of ones each step.
    ONE_ROW_OFFSETS: gl.constexpr = OFFSET and ONE_ROW
    if OFFSET:
        no_zero = gl.zeros([SPLIT, ROWS], gl.float32, layout=gl.SliceLayout(2, codes_layout))
        code_addend = zero_addend(no_zero, dtype)[:, :, None] + fill
        ones = gl.full([SPLIT, ROWS, GROUP], 1.0, dtype, layout=a_layout)
    if ONE_ROW_OFFSETS:
        GROUPS_OF_WARP: gl.constexpr = power_of_2_at_least(GROUPS)
        by_group: gl.constexpr = gl.BlockedLayout([1, 1, GROUPS_OF_WARP], [1, 32, 1], [SPLIT, 1, 1], [2, 1, 0])
        m_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, by_group)))
        m_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, by_group)))
        m_group = gl.arange(0, GROUPS_OF_WARP, layout=gl.SliceLayout(0, gl.SliceLayout(1, by_group)))[None, None, :]
        offsets = gl.load(z_ptr + (n0 + m_row)[None, :, None] * stride_sn + (m_split * GROUPS)[:, None, None] + m_group,
                          mask=m_group < GROUPS, other=0.0).to(gl.float32)  # fmt: skip
    acc = gl.zeros([SPLIT, ROWS, COLS], gl.float32, layout=mma)
    if PREFETCH:  # before the wait: under PDL the codes stream into L2 while the previous kernel drains
        prefetch_codes(w_ptr, n0, stride_wn, SPLIT, ROWS, SLICE // 2)
    preloaded = ()  # before the wait too: the first steps' codes in registers (they are weights, no kernel's output)
    if ONE_ROW:
        for step in gl.static_range(PRELOAD):
            preloaded = preloaded + (gl.load(codes_at + step * (GROUP // 2)),)
    if USE_PDL:  # x is the previous kernel's output
        wait_for_producers()
    if ONE_ROW:
        # One row of x (times smooth) for the whole K, a column once over the warps' lanes, loaded at once and stored
        # in shared memory (2 bytes a column); the steps, unrolled, read it in the B operand's layout (every lane
        # holds 32 columns) with no barrier between them. B's other columns hold copies of the row, which only the
        # unstored outputs read.
        GROUPS_P2: gl.constexpr = power_of_2_at_least(GROUPS)  # a tensor's shape: powers of 2
        whole: gl.constexpr = gl.BlockedLayout([GROUPS_P2, 1, GROUP // 32], [1, 1, 32], [1, SPLIT, 1], [2, 1, 0])
        g = gl.arange(0, GROUPS_P2, layout=gl.SliceLayout(1, gl.SliceLayout(2, whole)))[:, None, None]
        k_of_row = (
            g * GROUP + (gl.arange(0, SPLIT, layout=gl.SliceLayout(0, gl.SliceLayout(2, whole))) * SLICE)[None, :, None]
        )
        k_of_row += gl.arange(0, GROUP, layout=gl.SliceLayout(0, gl.SliceLayout(1, whole)))[None, None, :]
        row = gl.load(x_ptr + k_of_row, mask=g < GROUPS, other=0.0)
        if HAS_SMOOTH:  # x * smooth rounded to x's dtype, as int4.py's numerics say
            row = (row.to(gl.float32) * gl.load(smooth_ptr + part * K + k_of_row, mask=g < GROUPS, other=0.0)).to(dtype)
        if ONE_ROW_OFFSETS:  # each warp's groups' sums of x [SPLIT, GROUPS], times their offsets, added once
            x_sums = gl.convert_layout(gl.permute(gl.sum(row.to(gl.float32), axis=2), [1, 0]),
                                       gl.SliceLayout(1, by_group))  # fmt: skip
            moved = gl.sum(offsets * x_sums[:, None, :], axis=2)
            acc += gl.convert_layout(moved, gl.SliceLayout(2, mma))[:, :, None]
        if E2M1:
            row = e2m1_order(row, GROUPS_P2 * SPLIT, GROUP, 1)
        row = row.reshape([GROUPS_P2 * SPLIT, GROUP])  # row g * SPLIT + s: group g of warp s's slice
        row_smem = gl.allocate_shared_memory(dtype, [GROUPS_P2 * SPLIT, GROUP], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                             row)  # fmt: skip
        gl.thread_barrier()
        for step in gl.static_range(GROUPS):
            x = row_smem.slice(step * SPLIT, SPLIT).load(gl.SliceLayout(2, b_layout))[:, :, None]
            x = gl.broadcast(x, gl.zeros([SPLIT, GROUP, COLS], dtype, layout=b_layout))[0]
            if step < PRELOAD:
                packed = preloaded[step]
            else:
                packed = gl.load(codes_at + step * (GROUP // 2))
            acc = add_any_step(acc, x, step, packed, zeros_at, s_ptr + scales_at, z_ptr + scales_at, block_scales_at,
                               code_addend, ones, fill, a_layout, mma, SPLIT, ROWS, COLS, GROUP, OFFSET, False,
                               E2M1)  # fmt: skip
    else:
        for first in range(0, GROUPS, UNROLL):
            for u in gl.static_range(UNROLL):
                step = first + u
                x = gl.load(x_at + step * GROUP, mask=x_ok, other=0.0)
                if HAS_SMOOTH:  # x * smooth rounded to x's dtype, as int4.py's numerics say
                    x = (x.to(gl.float32) * gl.load(smooth_at + step * GROUP)).to(dtype)
                if E2M1:
                    x = gl.convert_layout(e2m1_order(x, SPLIT, GROUP, COLS), b_layout)  # a thread's 32 columns
                packed = gl.load(codes_at + step * (GROUP // 2))
                acc = add_any_step(acc, x, step, packed, zeros_at, s_ptr + scales_at, z_ptr + scales_at,
                                   block_scales_at, code_addend, ones, fill, a_layout, mma, SPLIT, ROWS, COLS, GROUP,
                                   OFFSET, OFFSET, E2M1)  # fmt: skip
    out = gl.sum(acc, axis=0)  # [ROWS, COLS]: the warps' slices added
    o_row = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(0, mma)))
    o_col = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(0, mma)))
    if E2M1:  # the global scale, and the 2^7 the decode left out
        out *= (gl.load(z_ptr + n0 + o_row) * 128.0)[:, None]
    if HAS_BIAS:
        out += gl.load(b_ptr + n0 + o_row).to(gl.float32)[:, None]
    gl.store(y_ptr + o_col[None, :] * N + (n0 + o_row)[:, None], out.to(dtype), mask=(o_col < M)[None, :])
