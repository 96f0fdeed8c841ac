"""The 4-bit codes' decodes into the 16-bit operands of a tensor-core MMA, in inline PTX called from Gluon: int4 (q - z,
decode_asm) and NVFP4 (e2m1 * s, e2m1_decode_asm with its scales, e2m1_scales_asm), four code bytes a call. The
kernels that call them are gluon_int4_kernels.py's (int4_linear and nvfp4_linear) and custom_ops/moe's MXFP4 one;
tests/test_int4_mma.py and test_nvfp4_mma.py check each decode's PTX against the codes' values.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


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
