"""nvfp4_linear's tensor-core decode: gluon_int4_kernels.int4_mma_kernel with E2M1 (launched by gluon_int4.nvfp4_mma).
As for int4 (tests/test_int4_mma.py), on the CPU: the decode's PTX over every code at every place of a word and every
e4m3 scale, subnormals included, against nvfp4.dequantize; the kernel compiled for sm_90a at every launch the tunings
offer; its whole PTX run by tests/ptx_emulator.py against nvfp4_linear_reference, and shown to fail for a decode that
swaps two columns. On the GPU: the kernel and the backend's default path against the reference."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from conftest import relative_error
from test_int4_mma import TOLERANCE, _to_bits, _to_float, run_decode_asm

from custom_ops.linear import gluon_int4, nvfp4
from custom_ops.linear.int4 import pack_codes

gluon = pytest.mark.skipif(not gluon_int4.gluon_available(), reason="needs triton with Gluon (3.5+)")
SCALE_FACTOR = {"bf16": 2.0**119, "fp16": 2.0**7}  # what e2m1_scale_pairs puts in $5, times s


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_decode_ptx_makes_each_code_times_its_scale(dtype):
    """Every pair of codes at every place of the 4-byte word (other places random), e4m3 scales from each subnormal to
    the largest:
    register j holds (column j, column j + 4) as e2m1 * s * 2^-7, exactly (the kernel's join / reshape / permute
    puts them back in column order)."""
    pytest.importorskip("triton.experimental.gluon")
    from custom_ops.linear.gluon_int4_decode import e2m1_decode_asm

    asm = e2m1_decode_asm(dtype)
    generator = torch.Generator().manual_seed(0)
    # every subnormal (2^-9 to 7 * 2^-9), the smallest normal, 1, odd mantissas, the largest (448)
    scales = torch.tensor([*range(1, 8), 0x08, 0x38, 0x3F, 0x55, 0x6B, 0x7E], dtype=torch.uint8)
    scales = scales.view(torch.float8_e4m3fn)
    words = torch.randint(0, 256, (256, 4), generator=generator, dtype=torch.uint8)
    for place in range(4):
        words[:, place] = torch.arange(256, dtype=torch.uint8)  # every byte: both codes of it
        for scale in scales.float().tolist():
            pair = _to_bits(scale * SCALE_FACTOR[dtype], dtype) * 0x10001
            expected = nvfp4.e2m1_values(nvfp4.unpack_codes(words)) * scale / 128
            for word, columns in zip(words.tolist(), expected.tolist()):
                packed = word[0] | (word[1] << 8) | (word[2] << 16) | (word[3] << 24)
                regs = run_decode_asm(asm, dtype, {"$4": packed, "$5": pair})
                values = [_to_float((regs[f"${j}"] >> s) & 0xFFFF, dtype) for j in range(4) for s in (0, 16)]
                assert values == [columns[c] for j in range(4) for c in (j, j + 4)], (word, scale)


def _compile(dtype: str, m: int, k: int, tile: dict):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from kernel_sass import compile_for_hopper

    from custom_ops.linear.gluon_int4_kernels import int4_mma_kernel

    launch = gluon_int4.mma_launch(m, 4096, k, gluon_int4.nvfp4_step(k), [2048, 1024, 1024], **tile)
    types = {"x_ptr": f"*{dtype}", "w_ptr": "*u8", "s_ptr": "*u8", "z_ptr": "*fp32", "smooth_ptr": "*fp32",
             "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}  # fmt: skip
    constexprs = {"K": k, "GROUP": gluon_int4.nvfp4_step(k), "HAS_SMOOTH": True, "HAS_BIAS": True, "OFFSET": False,
                  "USE_PDL": True, "E2M1": True, **launch}  # fmt: skip
    return compile_for_hopper(int4_mma_kernel, types, constexprs, ("N", "stride_xm", "stride_wn", "stride_sn"),
                              launch["SPLIT"])  # fmt: skip


@gluon
def test_the_kernel_compiles_for_hopper_at_every_launch():
    """Every MMA tile the tunings offer and the untuned launches, both dtypes, steps of 128 and 64 columns, one row and
    a batch: compiled for sm_90a (the decoded registers, and the scale pairs beside the code bytes, are where the MMA
    and the decode want them: assert_trivial), with tensor-core MMAs in the code."""
    from custom_ops.linear.int4_tuning import MMA_TILES, PRELOAD_TILES

    cases = [("bf16", 1, 4096, tile) for tile in (*MMA_TILES, *PRELOAD_TILES)]
    cases += [("fp16", 16, 4096, {}), ("bf16", 3, 4096 + 64, {}), ("bf16", 1, 576 * 8, {})]
    cases += [("bf16", m, k, gluon_int4.mma_default(m, 4096, k, True)) for k in (4096, 14336) for m in (1, 8)]
    for dtype, m, k, tile in cases:
        kernel = _compile(dtype, m, k, {key: value for key, value in tile.items() if key != "MMA"})
        assert re.search(r"mma\.sync\.aligned\.m16n8k16", kernel.asm["ptx"]), (dtype, m, k, tile)


def _case(generator, m, n, k, dtype, parts, bias, subnormal_scales=False):
    """Random codes (every value), scales from 2^-9 (subnormal) to 448 with both ends in (`subnormal_scales`: every
    scale an e4m3 subnormal, of either sign), global scales, a smooth in parts, a bias."""
    x = torch.randn(m, k, generator=generator).to(dtype)
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(n, k // 16, generator=generator) * 3).to(torch.float8_e4m3fn)
    scales[0, :4] = torch.tensor([2**-9, 3 * 2**-9, 7 * 2**-9, 448.0]).to(torch.float8_e4m3fn)
    if subnormal_scales:  # bits 0x01-0x07, the sign bit at random
        bits = torch.randint(1, 8, (n, k // 16), generator=generator, dtype=torch.uint8)
        bits |= torch.randint(0, 2, (n, k // 16), generator=generator, dtype=torch.uint8) << 7
        scales = bits.view(torch.float8_e4m3fn)
    global_scale = torch.rand(n, generator=generator) * 0.01 + 0.001
    smooth = torch.rand(len(parts), k, generator=generator) + 0.5 if parts else None
    smooth_rows = [n * p // sum(parts) for p in parts]
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return x, pack_codes(codes), scales, global_scale, smooth, smooth_rows, b


def _emulated_nvfp4_mma(x, weight, scales, global_scale, smooth, smooth_rows, bias, edit_ptx=None, **tile):
    """gluon_int4.nvfp4_mma's launch (without PDL), its compiled kernel run in tests/ptx_emulator.py; and the launch."""
    from ptx_emulator import run_kernel

    from custom_ops.linear.gluon_int4_kernels import int4_mma_kernel
    from custom_ops.linear.triton_int4 import triton_cdiv

    launch = gluon_int4.launch_for(x, weight, smooth, smooth_rows, None, tile) if x.is_cuda else gluon_int4.mma_launch(
        x.shape[0], weight.shape[0], x.shape[1], gluon_int4.nvfp4_step(x.shape[1]), smooth_rows, **tile)  # fmt: skip
    out = x.new_zeros(x.shape[0], weight.shape[0])
    runtime, constexprs = gluon_int4.kernel_arguments(launch, x, weight, scales, global_scale, smooth, smooth_rows,
                                                      bias, None, out)  # fmt: skip
    constexprs["USE_PDL"] = False
    run_kernel(int4_mma_kernel, triton_cdiv(weight.shape[0], launch["ROWS"]), launch["SPLIT"],
               dict(zip(int4_mma_kernel.arg_names, runtime)), constexprs, edit_ptx)  # fmt: skip
    return out, launch


# m, n, k, dtype, smooth parts, bias, tile; the launch the case is there for
EMULATED = {
    # every scale subnormal and of either sign, in both paths: e2m1_scale_pairs' float16 placement of the bits
    "one-row-subnormal-signed-scales": ((1, 64, 1024, torch.bfloat16, (1,), False, {}), {"ONE_ROW": True}),
    "5-rows-fp16-subnormal-signed-scales": ((5, 64, 512, torch.float16, (), True, {}), {"ONE_ROW": False}),
    "one-row-3-part-smooth-bias": ((1, 64, 1024, torch.bfloat16, (2, 1, 1), True, {}), {"ONE_ROW": True}),
    "3-rows-fp16-no-smooth": ((3, 64, 512, torch.float16, (), False, {}), {"ONE_ROW": False, "COLS": 8}),
    "one-row-steps-of-64": ((1, 32, 576, torch.bfloat16, (1,), True, {}), {"ONE_ROW": True, "SPLIT": 1}),
    "11-rows-64-channels-prefetch": ((11, 128, 512, torch.bfloat16, (1,), True, {"ROWS": 64, "SPLIT": 2, "PREFETCH": True}),
                                     {"ROWS": 64, "COLS": 16, "SPLIT": 2, "PREFETCH": True}),
    "one-row-preload-3": ((1, 64, 1024, torch.bfloat16, (1,), True, {"SPLIT": 2, "PRELOAD": 3}),
                          {"ONE_ROW": True, "SPLIT": 2, "PRELOAD": 3}),
}  # fmt: skip


@gluon
@pytest.mark.parametrize("case", EMULATED)
def test_the_compiled_kernel_matches_the_reference_in_a_ptx_emulator(case):
    """The whole kernel's sm_90a PTX, run on the CPU by tests/ptx_emulator.py, against nvfp4_linear_reference: every
    scale subnormal and signed (one row, 5 rows in float16), one row with a 3-part smooth and bias, 3 rows in float16,
    K = 576 in steps of 64 columns (SmolLM2's width), 11 rows over 64-channel programs with the prefetch."""
    (m, n, k, dtype, parts, bias, tile), expected_launch = EMULATED[case]
    args = _case(torch.Generator().manual_seed(0), m, n, k, dtype, parts, bias, "subnormal" in case)
    out, launch = _emulated_nvfp4_mma(*args, **tile)
    assert expected_launch.items() <= launch.items(), launch
    assert relative_error(out, nvfp4.nvfp4_linear_reference(*args)) < TOLERANCE[dtype], launch


@gluon
def test_the_ptx_emulator_test_fails_for_a_decode_that_swaps_two_columns():
    """The same check of a kernel whose decode shifts the word for column 1 where it should for column 0, and the
    other way round: it must fail."""
    (m, n, k, dtype, parts, bias, tile), _ = EMULATED["3-rows-fp16-no-smooth"]
    args = _case(torch.Generator().manual_seed(0), m, n, k, dtype, parts, bias)
    swaps = []

    def swap_columns(ptx: str) -> str:
        edited = re.sub(r"(shl\.b32\s+\S+,\s*\S+,\s*)(12|8);", lambda g: g.group(1) + ("8;" if g.group(2) == "12" else "12;"),
                        ptx)  # fmt: skip
        swaps.append(edited != ptx)
        return edited

    out, _ = _emulated_nvfp4_mma(*args, edit_ptx=swap_columns, **tile)
    assert swaps == [True]
    assert relative_error(out, nvfp4.nvfp4_linear_reference(*args)) > 0.1


def test_untuned_decode_calls_are_handed_to_the_tensor_core_decode(monkeypatch):
    """Untuned int4 and NVFP4 calls of up to 16 rows reach the kernel at mma_default's launch (its launch_for and
    run_launch stubbed: the CPU has no kernel to run); 17 rows, and a {"MMA": False} tile, do not."""
    from custom_ops.linear import triton_int4, triton_nvfp4

    launched = []
    monkeypatch.setattr(gluon_int4, "launch_for", lambda rows, w, smooth, smooth_rows, group, tile: dict(tile))
    monkeypatch.setattr(gluon_int4, "run_launch", lambda launch, rows, *args: launched.append(launch) or "kernel")
    monkeypatch.setattr(triton_int4, "TUNED_GEMV", {})
    monkeypatch.setattr(triton_int4, "TUNED_GEMM", {})
    monkeypatch.setattr(triton_nvfp4, "TUNED_GEMV", {})
    monkeypatch.setattr(triton_nvfp4, "TUNED_GEMM", {})
    weight, scales, global_scale = nvfp4.quantize_weight(torch.randn(64, 256))
    args = (weight, scales, global_scale, None, [], None)
    assert triton_int4.int4_gemv(torch.randn(1, 256), weight, scales, global_scale, None, [], None, 128) == "kernel"
    assert triton_int4.int4_gemm(torch.randn(16, 256), weight, scales, global_scale, None, [], None, 128) == "kernel"
    assert triton_nvfp4.nvfp4_gemv(torch.randn(1, 256), *args) == "kernel"
    assert triton_nvfp4.nvfp4_gemm(torch.randn(8, 256), *args) == "kernel"
    assert launched == [gluon_int4.mma_default(m, 64, 256, e2m1) for m, e2m1 in ((1, 0), (16, 0), (1, 1), (8, 1))]
    assert launched[2] == {"MMA": True, "ROWS": 16, "SPLIT": 8, "PREFETCH": True}  # NVFP4's own one-row launch
    decode = gluon_int4.tensor_core_decode
    assert decode({}, {}, torch.randn(17, 256), weight, scales, global_scale, None, [], None, None) is None
    assert decode({"MMA": False}, {}, torch.randn(1, 256), weight, scales, global_scale, None, [], None, None) is None
    assert decode({}, {"MMA": False}, torch.randn(1, 256), weight, scales, global_scale, None, [], None, None) is None
    assert len(launched) == 4


def test_a_call_the_kernel_does_not_take_is_refused_with_its_shapes():
    x = torch.randn(1, 256)
    weight, scales, global_scale = nvfp4.quantize_weight(torch.randn(32, 256))
    with pytest.raises(ValueError, match=r"does not take x \[1, 256\] torch.float32 on cpu with codes \[32, 128\]"):
        gluon_int4.nvfp4_mma(x, weight, scales, global_scale, None, [], None)


@pytest.mark.gpu
@gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernel_matches_the_reference_on_the_gpu(dtype):
    """Every MMA tile, 1, 8 and 16 rows, a 3-part smooth and bias, steps of 128 and 64 columns; and the backend's
    untuned path (the tensor-core decode by default) through the op."""
    from custom_ops.linear.int4_tuning import MMA_TILES, PRELOAD_TILES

    generator = torch.Generator().manual_seed(1)
    for m, k, bias in ((1, 2048, True), (8, 2048, False), (16, 576 * 4, True), (1, 576, False)):
        args = _case(generator, m, 256, k, dtype, (2, 1, 1) if k != 576 else (1,), bias)
        expected = nvfp4.nvfp4_linear_reference(*args)
        cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
        for tile in (*MMA_TILES, *PRELOAD_TILES):
            out = gluon_int4.nvfp4_mma(*cuda, **tile)
            assert relative_error(out.cpu(), expected) < TOLERANCE[dtype], (m, k, tile)
        out = torch.ops.compiled_llm.nvfp4_linear(*cuda, "triton")
        assert relative_error(out.cpu(), expected) < TOLERANCE[dtype], (m, k, "default")


@pytest.mark.gpu
@gluon
def test_gpus_without_the_kernels_instructions_get_no_launch(monkeypatch):
    """Before sm_80 (no mma.m16n8k16), and on ROCm, launch_for says None (the Triton kernels run); before sm_90 the
    bulk prefetch is off."""
    rows, weight = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), torch.zeros(64, 128, dtype=torch.uint8)
    weight = weight.cuda()
    for capability, expected in (((7, 5), None), ((0, 0), None), ((8, 0), False), ((9, 0), True)):
        monkeypatch.setattr(gluon_int4, "nvidia_capability", lambda index, capability=capability: capability)
        launch = gluon_int4.launch_for(rows, weight, None, [], 128, {"PREFETCH": True})
        assert (launch if expected is None else launch["PREFETCH"]) == expected, capability
