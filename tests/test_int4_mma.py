"""int4_linear's tensor-core decode (custom_ops/linear/gluon_int4*.py). Gluon kernels do not run in Triton's
interpreter, so on the CPU: the decode's PTX run by a small emulator of its three instructions over every byte and
zero point, against int4.unpack_codes; the code bytes of one decode call shown to be 4 consecutive columns in the
layout (what pack=4 assumes); the kernel compiled for sm_90a with every launch the tunings offer; and the compiled
kernel's whole PTX run by tests/ptx_emulator.py against the reference. On the GPU: the kernel against the reference
over rows, dtypes, zero points and offsets, smooth parts and bias."""

from __future__ import annotations

import os
import re
import struct
import sys

import pytest
import torch
from conftest import relative_error, run_in_interpreter

from custom_ops.linear import gluon_int4
from custom_ops.linear.int4 import int4_linear_reference, pack_codes, quantize_weight, unpack_codes

gluon = pytest.mark.skipif(not gluon_int4.gluon_available(), reason="needs triton with Gluon (3.5+)")
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _to_float(bits: int, dtype: str) -> float:
    if dtype == "bf16":
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def _to_bits(value: float, dtype: str) -> int:
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    return int(torch.tensor(value, dtype=torch.float32).to(torch_dtype).view(torch.int16)) & 0xFFFF


def run_decode_asm(asm: str, dtype: str, operands: dict[str, int]) -> dict[str, int]:
    """The decode's PTX on 32-bit registers: mov, shr, shl, and, prmt (default mode), lop3 and fma.rn on pairs of 16-bit
    floats (each half rounded once: exact here, as int4's results are small integers and NVFP4's have at most 6
    significant bits; subnormal inputs and outputs kept, as PTX's fma does without .ftz)."""
    regs = dict(operands)
    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        val = [regs[a] if a in regs else int(a, 0) for a in src]
        if op == "mov.b32":
            regs[dst] = val[0]
        elif op == "shr.b32":
            regs[dst] = val[0] >> val[1]
        elif op == "shl.b32":
            regs[dst] = (val[0] << val[1]) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[dst] = val[0] & val[1]
        elif op == "prmt.b32":
            pool = val[0] | (val[1] << 32)
            regs[dst] = sum(((pool >> (8 * ((val[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "lop3.b32":
            a, b, c, lut = val
            regs[dst] = sum((((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i)
                            for i in range(32))  # fmt: skip
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            halves = [
                _to_bits(_to_float((val[0] >> s) & 0xFFFF, dtype) * _to_float((val[1] >> s) & 0xFFFF, dtype)
                         + _to_float((val[2] >> s) & 0xFFFF, dtype), dtype)
                for s in (0, 16)
            ]  # fmt: skip
            regs[dst] = halves[0] | (halves[1] << 16)
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return regs


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_decode_ptx_makes_each_code_minus_its_zero_point(dtype):
    """Every byte value at every place of the 4-byte word, every zero point: the columns that the kernel's
    join / reshape / permute make of the two outputs (first4[4 g + i] column 8 g + i, last4[4 g + i] column
    8 g + 4 + i; Triton packs a call's outputs into registers in element order) are unpack_codes' codes minus z."""
    pytest.importorskip("triton.experimental.gluon")
    from custom_ops.linear.gluon_int4_decode import decode_asm

    asm = decode_asm(dtype)
    bias = 128.0 if dtype == "bf16" else 1024.0
    generator = torch.Generator().manual_seed(0)
    words = torch.cat(
        [torch.arange(256).repeat_interleave(4).view(-1, 4), torch.randint(0, 256, (64, 4), generator=generator)]
    )
    for zero in range(16):
        addend = _to_bits(-bias - zero, dtype) * 0x10001
        for word in words.tolist():
            packed = word[0] | (word[1] << 8) | (word[2] << 16) | (word[3] << 24)
            regs = run_decode_asm(asm, dtype, {"$4": packed, "$5": addend})
            values = [_to_float((regs[f"${r}"] >> s) & 0xFFFF, dtype) for r in range(4) for s in (0, 16)]
            columns = values  # first4 (columns 0-3) then last4 (4-7): the kernel's join / reshape / permute
            codes = unpack_codes(torch.tensor([word], dtype=torch.uint8))[0].tolist()
            assert columns == [float(q - zero) for q in codes], (word, zero)


@gluon
@pytest.mark.parametrize("group", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("rows", [16, 64])
def test_a_decode_call_reads_four_consecutive_code_bytes(group, split, rows):
    """pack=4 hands a call 4 consecutive registers of a thread: in the codes' layout, register bits 0 and 1 must step
    one and two bytes along K (and the decoded values' layout must be the MMA operand's, which the kernel's
    convert_layout(assert_trivial=True) checks at compile time)."""
    libtriton = pytest.importorskip("triton._C.libtriton")  # private: a later triton may move it
    if not hasattr(libtriton, "gluon_ir"):
        pytest.skip("this triton's bindings have no gluon_ir")
    gluon_ir, ir = libtriton.gluon_ir, libtriton.ir

    from custom_ops.linear.gluon_int4_kernels import operand_layout

    context = ir.context()
    ir.load_dialects(context)
    builder = gluon_ir.GluonOpBuilder(context)
    layout = operand_layout(split, group, 0, True)
    linear = builder.to_linear_layout(layout._to_ir(builder), [split, rows, group // 2])
    assert linear.reg_bases[:2] == [[0, 0, 1], [0, 0, 2]]


def test_mma_launch_fits_the_shape():
    """ROWS halves to divide N and every smooth part, SPLIT and UNROLL to divide the groups; unsupported shapes are
    None."""
    launch = gluon_int4.mma_launch(1, 6144, 4096, 128, [4096, 1024, 1024], ROWS=64, SPLIT=8, UNROLL=4, PRELOAD=8)
    assert launch == {"ROWS": 64, "SPLIT": 8, "UNROLL": 4, "COLS": 8, "ONE_ROW": True, "PREFETCH": False,
                      "PRELOAD": 4}  # a warp's 4 steps preloaded at most
    launch = gluon_int4.mma_launch(9, 6144 + 32, 14336, 128, [], ROWS=64, SPLIT=8, UNROLL=4, PRELOAD=2)
    assert launch == {"ROWS": 32, "SPLIT": 8, "UNROLL": 2, "COLS": 16, "ONE_ROW": False, "PREFETCH": False,
                      "PRELOAD": 0}  # 14 a warp; preloading is one row's
    assert gluon_int4.mma_launch(1, 48, 384, 128, [], SPLIT=4, UNROLL=2)["SPLIT"] == 1  # 3 groups
    assert not gluon_int4.mma_launch(1, 64, 65536, 128, [])["ONE_ROW"]  # its row would take 128 KB of shared memory
    assert not gluon_int4.mma_launch(1, 64, 999 * 32, 32, [])["ONE_ROW"]  # 999 groups on one warp: too many steps
    assert gluon_int4.mma_launch(17, 64, 256, 128, []) is None  # more rows than the MMA's 16 columns
    assert gluon_int4.mma_launch(1, 40, 256, 128, []) is None  # N not a multiple of 16
    assert gluon_int4.mma_launch(1, 64, 256, 16, []) is None  # groups under 32 columns
    assert gluon_int4.mma_launch(1, 64, 96 * 2, 96, []) is None  # not a power of 2


def test_the_prefetch_is_off_for_codes_not_16_byte_aligned():
    """cp.async.bulk.prefetch faults on a source that is not 16-byte aligned: a view one byte in, or rows of 8 bytes."""
    codes = torch.zeros(64, 64 + 16, dtype=torch.uint8)
    assert gluon_int4.prefetch_takes(codes[:, :64]) and gluon_int4.prefetch_takes(codes)
    assert not gluon_int4.prefetch_takes(codes[:, 1:65])
    assert not gluon_int4.prefetch_takes(torch.zeros(64, 8, dtype=torch.uint8))


def test_a_call_the_kernel_does_not_take_is_refused_with_its_shapes():
    """float32 rows on the CPU: neither what the PTX decode writes nor a CUDA tensor."""
    x = torch.randn(1, 256)
    quantized = quantize_weight(torch.randn(32, 256), 128)
    with pytest.raises(
        ValueError, match=r"does not take x \[1, 256\] torch.float32 on cpu with codes \[32, 128\] in groups of 128"
    ):
        gluon_int4.int4_mma(x, *quantized, None, [], None, 128)


def check_a_tuned_mma_launch_falls_back_where_the_kernel_does_not_take_the_call() -> None:
    """A tuned {"MMA": True} launch for a GEMV and a GEMM shape, and the untuned one, called with float32 rows on the CPU
    (what the kernel does not take): the Triton kernels' results, against the reference; the same as a tuner's
    candidate raises."""
    from custom_ops.linear import triton_int4

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 256, generator=generator)
    quantized = quantize_weight(weight, 128)
    for rows, table, key, launch in ((1, triton_int4.TUNED_GEMV, (-1, 32, 256, 128, False), triton_int4.int4_gemv),
                                     (3, triton_int4.TUNED_GEMM, (-1, 32, 256, 128, False, 16), triton_int4.int4_gemm)):  # fmt: skip
        x = torch.randn(rows, 256, generator=generator)
        table[key] = {"MMA": True, "ROWS": 32}
        expected = int4_linear_reference(x, *quantized, None, [], None, 128)
        assert relative_error(launch(x, *quantized, None, [], None, 128), expected) < 1e-5
        with pytest.raises(ValueError, match="does not take"):
            launch(x, *quantized, None, [], None, 128, MMA=True)
        del table[key]  # untuned: the tensor-core decode's default launch (gluon_int4.mma_default), not taken either
        assert relative_error(launch(x, *quantized, None, [], None, 128), expected) < 1e-5


def test_a_tuned_mma_launch_falls_back_where_the_kernel_does_not_take_the_call():
    pytest.importorskip("triton")
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import test_int4_mma as t; "
        "t.check_a_tuned_mma_launch_falls_back_where_the_kernel_does_not_take_the_call()"
    )


@gluon
def test_the_kernel_compiles_for_hopper_at_every_tuned_launch():
    """Every MMA tile the tunings offer and the untuned launches, both dtypes, zero points and offsets, one row and a
    batch: compiled for sm_90a
    (the decoded registers are the MMA's operand as they are: assert_trivial), with tensor-core MMAs in the code."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from kernel_sass import compile_for_hopper

    from custom_ops.linear.gluon_int4_kernels import int4_mma_kernel
    from custom_ops.linear.int4_tuning import MMA_TILES, PRELOAD_TILES

    cases = [(tile, "bf16", False, 1, 128) for tile in (*MMA_TILES, *PRELOAD_TILES)]
    cases += [({"MMA": True}, "fp16", False, 16, 64), ({"MMA": True}, "bf16", True, 3, 32)]
    # the untuned launches of batches (one row's are tuned tiles too)
    cases += [
        (gluon_int4.mma_default(8, n, k), "bf16", False, 8, 128)
        for n, k in ((6144, 4096), (28672, 4096), (4096, 14336))
    ]
    for tile, dtype, offsets, m, group in cases:
        launch = gluon_int4.mma_launch(
            m, 4096, 4096, group, [2048, 1024, 1024], **{k: v for k, v in tile.items() if k != "MMA"}
        )
        types = {"x_ptr": f"*{dtype}", "w_ptr": "*u8", "s_ptr": f"*{dtype}", "z_ptr": f"*{dtype}" if offsets else "*u8",
                 "smooth_ptr": "*fp32", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}  # fmt: skip
        constexprs = {"K": 4096, "GROUP": group, "HAS_SMOOTH": not offsets, "HAS_BIAS": True, "OFFSET": offsets,
                      "USE_PDL": True, "E2M1": False, **launch}  # fmt: skip
        kernel = compile_for_hopper(int4_mma_kernel, types, constexprs, ("N", "stride_xm", "stride_wn", "stride_sn"),
                                    launch["SPLIT"])  # fmt: skip
        assert re.search(r"mma\.sync\.aligned\.m16n8k16", kernel.asm["ptx"]), (tile, dtype, offsets, m)


def _case(generator, m, n, k, group, dtype, offsets, parts, bias):
    x = torch.randn(m, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator) / k**0.5
    if offsets and not parts:  # GGUF's Q4_1 form: w = q s + m, float16 scales and offsets, no smooth
        codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
        scales = (torch.rand(n, k // group, generator=generator) * 0.02 + 0.001).half()
        shifts = -(torch.rand(n, k // group, generator=generator) * 0.1).half()
        quantized, smooth, smooth_rows = (pack_codes(codes), scales, shifts), None, []
    else:
        smooth = torch.rand(len(parts), k, generator=generator) + 0.5
        smooth_rows = [n * p // sum(parts) for p in parts]
        # zero points (AWQ's checkpoints), or int4_awq's own float offsets
        divided = torch.repeat_interleave(smooth, torch.tensor(smooth_rows), dim=0)
        quantized = quantize_weight(weight, group, divided, offsets=offsets)
        quantized = (quantized[0], quantized[1].to(dtype), quantized[2].to(dtype) if offsets else quantized[2])
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return x, quantized, smooth, smooth_rows, b


@pytest.mark.gpu
@gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernel_matches_the_reference_on_the_gpu(dtype):
    """Rows 1 (the ONE_ROW path), 3, 8 and 16 (two 8-column MMAs); zero points with a 3-part smooth and a bias, and
    float offsets; groups of 32, 64 and 128; each MMA tile of the tunings."""
    from custom_ops.linear.int4_tuning import MMA_TILES, PRELOAD_TILES

    generator = torch.Generator().manual_seed(1)
    for m, group, offsets, bias in ((1, 128, False, True), (3, 128, False, False), (8, 64, False, True),
                                    (16, 128, False, False), (1, 32, True, False), (5, 32, True, True),
                                    (1, 128, True, True), (6, 64, True, False)):  # fmt: skip
        # parts of 128, 64, 64 channels: the 32- and 64-channel programs run on a multi-part smooth (GGUF's offsets
        # in groups of 32 without one, int4_awq's with it)
        parts = () if offsets and group == 32 else (2, 1, 1)
        x, quantized, smooth, smooth_rows, b = _case(generator, m, 256, 2048, group, dtype, offsets, parts, bias)
        expected = int4_linear_reference(x, *quantized, smooth, smooth_rows, b, group)
        cuda = [t.cuda() if t is not None else None for t in (x, *quantized, smooth, b)]
        for tile in (*MMA_TILES, *PRELOAD_TILES):
            out = gluon_int4.int4_mma(cuda[0], *cuda[1:4], cuda[4], smooth_rows, cuda[5], group, **tile)
            assert relative_error(out.cpu(), expected) < TOLERANCE[dtype], (m, group, offsets, tile)


def _emulated_int4_mma(x, qweight, scales, zeros, smooth, smooth_rows, bias, group, edit_ptx=None, **tile):
    """gluon_int4.int4_mma's launch (without PDL), its compiled kernel run in tests/ptx_emulator.py; and the launch."""
    from ptx_emulator import run_kernel

    from custom_ops.linear.gluon_int4_kernels import int4_mma_kernel
    from custom_ops.linear.triton_int4 import triton_cdiv

    m, n, k = x.shape[0], qweight.shape[0], 2 * qweight.shape[1]
    launch = gluon_int4.mma_launch(m, n, k, group, list(smooth_rows) if smooth is not None else [], **tile)
    out = x.new_zeros(m, n)
    runtime, constexprs = gluon_int4.kernel_arguments(launch, x, qweight, scales, zeros, smooth, smooth_rows, bias,
                                                      group, out)  # fmt: skip
    args = dict(zip(int4_mma_kernel.arg_names, runtime))  # the runtime arguments, in order
    constexprs["USE_PDL"] = False
    run_kernel(int4_mma_kernel, triton_cdiv(n, launch["ROWS"]), launch["SPLIT"], args, constexprs, edit_ptx)
    return out, launch


# m, n, k, group, dtype, offsets, smooth parts, bias, tile; the launch the case is there for
EMULATED = {
    "one-row-3-part-smooth-bias": ((1, 64, 1024, 128, torch.bfloat16, False, (2, 1, 1), True, {}), {"ONE_ROW": True}),
    "3-rows-fp16-zero-points": ((3, 64, 512, 64, torch.float16, False, (1,), False, {}), {"ONE_ROW": False, "COLS": 8}),
    # 3 groups a warp: the staged row padded to 4 groups, the padding masked
    "one-row-3-groups-a-warp": ((1, 32, 768, 64, torch.bfloat16, False, (1,), True, {}), {"ONE_ROW": True, "SPLIT": 4}),
    "11-rows-64-channels-over-parts": (
        (11, 256, 512, 64, torch.bfloat16, False, (2, 1, 1), True, {"ROWS": 64}), {"ROWS": 64, "COLS": 16}),
    "offsets-group-32-bias": ((5, 64, 512, 32, torch.bfloat16, True, (), True, {}), {"COLS": 8}),
    "one-row-offsets-3-part-smooth": ((1, 64, 1024, 128, torch.bfloat16, True, (2, 1, 1), False, {}), {"ONE_ROW": True}),
    "split-8-unroll-4": (
        (2, 64, 2048, 32, torch.float16, False, (1,), True, {"SPLIT": 8, "UNROLL": 4}), {"SPLIT": 8, "UNROLL": 4}),
    # the bulk L2 prefetch: the emulator checks its sources lie in the codes, 16-byte aligned
    "one-row-prefetch": ((1, 64, 1024, 128, torch.bfloat16, False, (1,), False, {"SPLIT": 8, "PREFETCH": True}),
                         {"ONE_ROW": True, "PREFETCH": True}),
    # the first steps' codes loaded before the wait: 2 of a warp's 4 steps, and all of them (asked for more)
    "one-row-preload-2-of-4": ((1, 64, 1024, 64, torch.bfloat16, False, (2, 1, 1), True, {"PRELOAD": 2}),
                               {"ONE_ROW": True, "PRELOAD": 2}),
    "one-row-offsets-preload-all": ((1, 64, 1024, 128, torch.float16, True, (2, 1, 1), False, {"PRELOAD": 8}),
                                    {"ONE_ROW": True, "PRELOAD": 2}),
}  # fmt: skip


@gluon
@pytest.mark.parametrize("case", EMULATED)
def test_the_compiled_kernel_matches_the_reference_in_a_ptx_emulator(case):
    """The whole kernel's sm_90a PTX, run on the CPU by tests/ptx_emulator.py (every CTA, in lockstep), against
    int4_linear_reference: the one-row path with a 3-part smooth and bias and with 3 groups a warp (a padded
    staging), zero points in float16, 16 columns over
    64-channel programs across smooth parts (128, 64, 64), float offsets in groups of 32 (GGUF's) and of 128 under a
    3-part smooth (int4_awq's), SPLIT=8 with UNROLL, the first steps' codes preloaded."""
    (m, n, k, group, dtype, offsets, parts, bias, tile), expected_launch = EMULATED[case]
    x, quantized, smooth, smooth_rows, b = _case(torch.Generator().manual_seed(0), m, n, k, group, dtype, offsets,
                                                 parts, bias)  # fmt: skip
    out, launch = _emulated_int4_mma(x, *quantized, smooth, smooth_rows, b, group, **tile)
    assert expected_launch.items() <= launch.items(), launch
    expected = int4_linear_reference(x, *quantized, smooth, smooth_rows, b, group)
    assert relative_error(out, expected) < TOLERANCE[dtype], launch


@gluon
def test_the_ptx_emulator_test_fails_for_a_kernel_that_swaps_the_nibbles():
    """The same check of a kernel whose decode takes a byte's high nibble for its even column: it must fail."""
    (m, n, k, group, dtype, offsets, parts, bias, tile), _ = EMULATED["3-rows-fp16-zero-points"]
    x, quantized, smooth, smooth_rows, b = _case(torch.Generator().manual_seed(0), m, n, k, group, dtype, offsets,
                                                 parts, bias)  # fmt: skip
    swaps = []

    def swap_nibbles(ptx: str) -> str:  # prmt selector 0x(4+b)(4+b)(b)(b) -> 0x(b)(b)(4+b)(4+b)
        ptx, count = re.subn(r"(prmt\.b32 [^;]*, 0x)(\d)\2(\d)\3;", r"\1\3\3\2\2;", ptx)
        swaps.append(count)
        return ptx

    out, _ = _emulated_int4_mma(x, *quantized, smooth, smooth_rows, b, group, edit_ptx=swap_nibbles, **tile)
    assert swaps[0] > 0
    assert relative_error(out, int4_linear_reference(x, *quantized, smooth, smooth_rows, b, group)) > TOLERANCE[dtype]


@gluon
def test_the_ptx_emulator_catches_a_prefetch_off_its_alignment():
    """The one-row prefetch case with each bulk prefetch's source moved 8 bytes: the emulator refuses it, as the GPU
    would fault; so the case above checks the kernel's own sources."""
    (m, n, k, group, dtype, offsets, parts, bias, tile), _ = EMULATED["one-row-prefetch"]
    x, quantized, smooth, smooth_rows, b = _case(torch.Generator().manual_seed(0), m, n, k, group, dtype, offsets,
                                                 parts, bias)  # fmt: skip
    moved = []

    def move_prefetch(ptx: str) -> str:
        edited = re.sub(r"(cp\.async\.bulk\.prefetch\.L2\.global \[%rd\d+)\]", r"\1+8]", ptx)
        moved.append(edited != ptx)
        return edited

    with pytest.raises(ValueError, match="not 16-byte aligned"):
        _emulated_int4_mma(x, *quantized, smooth, smooth_rows, b, group, edit_ptx=move_prefetch, **tile)
    assert moved == [True]
