"""One token's MXFP4 experts on tensor cores (custom_ops/moe/gluon_mxfp4.py, gluon_mxfp4_kernels.py). Gluon kernels do
not run in Triton's interpreter, so on the CPU: the kernel compiled for sm_90a and its whole PTX run in
tests/ptx_emulator.py against the dequantized weights' sums in float64 (x's row per token or per pair, every exponent
from 0 to 252, an id of another rank), shown to fail for a kernel whose decode is off by one binade;
and the epilogue (one_token_epilogue_kernel, in Triton's interpreter) through the op against its reference, with the
kernel's sums computed by torch. On the GPU: the op under every MMA tile against the reference."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import relative_error, run_in_interpreter
from test_moe_experts import TOLERANCE, check_sum_over_experts, with_tile
from test_moe_mxfp4 import check_mxfp4_triton_against_reference

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from custom_ops.linear import gluon_int4
from custom_ops.moe import gluon_mxfp4, triton_moe
from custom_ops.moe.mxfp4 import dequantize_mxfp4, random_mxfp4
from custom_ops.moe.tuning import MMA_TILES
from custom_ops.triton_runtime import triton_available

gluon = pytest.mark.skipif(not gluon_int4.gluon_available(), reason="needs triton with Gluon (3.5+)")


def reference_sums(a, w, exponents, ids, top_k, a_per_token) -> torch.Tensor:
    """What the kernel writes, in float64: each pair's row of a through every row of its expert's weights; zeros for
    an id outside [0, E)."""
    raw = torch.zeros(ids.numel(), w.shape[1], dtype=torch.float64)
    for pair, expert in enumerate(ids.tolist()):
        if 0 <= expert < w.shape[0]:
            row = a[pair // top_k if a_per_token else pair].double()
            raw[pair] = dequantize_mxfp4(w[expert], exponents[expert], torch.float64) @ row
    return raw


def emulated(a, w, exponents, ids, top_k, a_per_token, edit_ptx=None, **tile) -> torch.Tensor:
    """gluon_mxfp4.experts_mma's launch (without PDL), its compiled kernel run in tests/ptx_emulator.py."""
    from ptx_emulator import run_kernel

    from custom_ops.moe.gluon_mxfp4_kernels import mxfp4_experts_mma_kernel as kernel

    launch = gluon_mxfp4.mma_launch(w.shape[1], 2 * w.shape[2], **tile)
    raw = torch.zeros(ids.numel(), w.shape[1])
    args, constexprs = gluon_mxfp4.kernel_arguments(launch, a, w, exponents, ids, top_k, a_per_token, raw)
    run_kernel(kernel, ids.numel() * (w.shape[1] // gluon_mxfp4.ROWS), launch["SPLIT"],
               dict(zip(kernel.arg_names, args)), {**constexprs, "USE_PDL": False}, edit_ptx)  # fmt: skip
    return raw


def emulated_case(dtype, experts, n, k, pairs, rows=None, seed=0):
    """x [rows (pairs by default), k], MXFP4 experts [experts, n, k] with exponents 100-140 and a few extremes, and
    random ids but the last pair's, another rank's."""
    generator = torch.Generator().manual_seed(seed)
    w, exponents = random_mxfp4(experts, n, k, generator=generator, exponents=(100, 140))
    exponents[0, 0, 0], exponents[1, 1, -1], exponents[0, 2, 1] = 0, 200, 120  # the smallest scale, and a large one
    ids = torch.randint(0, experts, (pairs,), generator=generator, dtype=torch.int32)
    ids[-1] = experts  # another rank's expert
    a = torch.randn(rows or pairs, k, generator=generator).to(dtype)
    return a, w, exponents, ids


# dtype, experts, n, k, pairs, top_k (x's row per pair: pair // top_k, gate/up's; else pair, down's), tile
EMULATED = {
    "bf16-two-warps-unrolled": (torch.bfloat16, 3, 32, 256, 4, None, {"SPLIT": 2, "UNROLL": 2}),
    "fp16-one-warp-three-groups": (torch.float16, 2, 16, 96, 3, None, {"SPLIT": 2, "UNROLL": 3}),
    "bf16-a-row-per-token-of-2-pairs": (torch.bfloat16, 3, 48, 128, 6, 2, {"SPLIT": 2, "UNROLL": 2}),
}


@gluon
@pytest.mark.parametrize("case", EMULATED)
def test_the_compiled_kernel_matches_the_sums_in_a_ptx_emulator(case):
    dtype, experts, n, k, pairs, top_k, tile = EMULATED[case]
    a, w, exponents, ids = emulated_case(dtype, experts, n, k, pairs, pairs // (top_k or 1))
    raw = emulated(a, w, exponents, ids, top_k or 1, top_k is not None, **tile)
    expected = reference_sums(a, w, exponents, ids, top_k or 1, top_k is not None)
    assert not raw[-1].any()  # another rank's expert: zeros
    assert relative_error(raw, expected) < 1e-6


@gluon
def test_every_exponent_scales_exactly():
    """Row r of the weight under exponent r for r = 0..252 (past it, 6 * 2^(r - 127) overflows float32 and so does
    dequantize_mxfp4's table; 255 is e8m0's NaN), x small enough that 2^125 times a row's sum stays finite: every
    row's sum as the float64 one, to float32's rounding (and its subnormals' spacing)."""
    a, w, exponents, ids = emulated_case(torch.bfloat16, 2, 256, 64, 1)
    exponents[0] = torch.arange(256, dtype=torch.uint8)[:, None]
    ids[0] = 0
    a = (a.float() / 1024).to(torch.bfloat16)
    raw = emulated(a, w, exponents, ids, 1, False, SPLIT=1, UNROLL=1)
    expected = reference_sums(a, w, exponents, ids, 1, False)
    torch.testing.assert_close(raw[0, :253].double(), expected[0, :253], rtol=1e-6, atol=2.0**-140)


@gluon
def test_the_ptx_emulator_test_fails_for_a_kernel_whose_scales_are_off_by_one_binade():
    """The same check of a kernel whose decode doubles each value (its scale pair 2^127 where it should be 2^126):
    it must fail."""
    dtype, experts, n, k, pairs, _, tile = EMULATED["bf16-two-warps-unrolled"]
    a, w, exponents, ids = emulated_case(dtype, experts, n, k, pairs)
    edits = []

    def one_binade_more(ptx: str) -> str:
        edited = re.sub(r"(mov\.b32\s+%r\d+,\s*)2122350208;", r"\g<1>2130722560;", ptx)  # 0x7E807E80 -> 0x7F007F00
        edits.append(edited != ptx)
        return edited

    raw = emulated(a, w, exponents, ids, 1, False, edit_ptx=one_binade_more, **tile)
    assert edits == [True]
    assert relative_error(raw, reference_sums(a, w, exponents, ids, 1, False)) > 0.5


@gluon
def test_the_kernel_compiles_for_hopper_at_every_tile_the_tuning_offers():
    """GPT-OSS-20B's gate/up and down ([5760 | 2880, 2880]) in bfloat16 and float16, each MMA tile: compiled for sm_90a
    (the decoded registers are where the MMA wants them: assert_trivial), with tensor-core MMAs in the code."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from kernel_sass import compile_for_hopper

    from custom_ops.moe.gluon_mxfp4_kernels import mxfp4_experts_mma_kernel as kernel

    strides = ("N", "stride_xm", "stride_we", "stride_wn", "stride_ee", "stride_en", "stride_ym")
    for dtype, n, tile in [("bf16", 5760, t) for t in MMA_TILES] + [("fp16", 2880, MMA_TILES[0])]:
        launch = gluon_mxfp4.mma_launch(n, 2880, SPLIT=tile["SPLIT"], UNROLL=tile["UNROLL"])
        types = {"x_ptr": f"*{dtype}", "w_ptr": "*u8", "e_ptr": "*u8", "ids_ptr": "*i64", "y_ptr": "*fp32"}
        constexprs = {"K": 2880, "A_PER_TOKEN": n == 5760, "USE_PDL": True, **launch}
        compiled = compile_for_hopper(kernel, types, constexprs, strides, launch["SPLIT"])
        assert re.search(r"mma\.sync\.aligned\.m16n8k16", compiled.asm["ptx"]), (dtype, n, tile)


def check_epilogue_against_reference(device: str, dtype: torch.dtype) -> None:
    """The op's one-token calls under an MMA tile, the kernel's sums computed by torch (reference_sums): the epilogue
    (gate and up columns, GPT-OSS's interleaved rows, biases, the activation, routing weights) against the op's
    reference, the cases of test_moe_mxfp4; then test_moe_experts' sums over k = 8 pairs, ids of another rank among
    them (zeros, not the activation of a bias)."""
    takes, mma, calls = gluon_mxfp4.takes, gluon_mxfp4.experts_mma, []

    def sums(a, w, e, ids, top_k, per_token, **tile):
        calls.append(w.shape)
        return reference_sums(a.cpu(), w.cpu(), e.cpu(), ids.cpu(), top_k, per_token).float().to(a.device)

    try:
        gluon_mxfp4.takes, gluon_mxfp4.experts_mma = (lambda a, w, exponents: True), sums
        with_tile(MMA_TILES[0], check_mxfp4_triton_against_reference, device, dtype)
        assert len(calls) == 6  # gate/up and down of the 3 one-token calls
        check_sum_over_experts(device, dtype, sum_tiles=(MMA_TILES[0],), formats=("mxfp4",))
        assert len(calls) == 10  # one token's gate/up and down at k = 8 and at k = 6, over a rank's experts
    finally:
        gluon_mxfp4.takes, gluon_mxfp4.experts_mma = takes, mma


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_the_epilogue_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_moe_mxfp4_mma as t; "
        "t.check_epilogue_against_reference('cpu', torch.float32)"
    )


def test_a_one_token_call_takes_the_kernel_only_where_it_runs(monkeypatch):
    """Under an MMA tile a one-token call reaches gluon_mxfp4 where `takes` says the kernel runs; elsewhere (the CPU,
    here) the call runs the other kernels; the launch fits GPT-OSS's K = 2,880 (45 groups a warp at SPLIT 2)."""
    assert gluon_mxfp4.mma_launch(5760, 2880) == {"ROWS": 16, "SPLIT": 2, "UNROLL": 5}
    assert gluon_mxfp4.mma_launch(2880, 2880, SPLIT=4, UNROLL=4) == {"ROWS": 16, "SPLIT": 2, "UNROLL": 3}
    assert gluon_mxfp4.mma_launch(24, 2880) is None and gluon_mxfp4.mma_launch(32, 80) is None
    w, exponents = random_mxfp4(2, 32, 64)
    a = torch.randn(1, 64)
    assert not gluon_mxfp4.takes(a, w, exponents)
    called = []
    monkeypatch.setattr(gluon_mxfp4, "takes", lambda *args: True)
    monkeypatch.setattr(triton_moe, "_one_token_mma", lambda *args: called.append(args) or "mma")
    blocks = triton_moe.expert_blocks(torch.tensor([[1, 0]]), 2)
    out = torch.empty(2, 16)
    assert triton_moe.grouped_gemm(a, w, None, out, None, blocks, gated=True, a_per_token=True, tile=MMA_TILES[0],
                                   mxfp4_scales=exponents) == "mma"  # fmt: skip
    assert len(called) == 1


@pytest.mark.gpu
@gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_op_under_every_mma_tile_on_the_gpu(dtype):
    for tile in MMA_TILES:
        with_tile(tile, check_mxfp4_triton_against_reference, "cuda", dtype)
    # the kernel's sums themselves, at GPT-OSS-20B's K
    a, w, exponents, ids = emulated_case(dtype, 4, 64, 2880, 4)
    raw = gluon_mxfp4.experts_mma(a.cuda(), w.cuda(), exponents.cuda(), ids.cuda(), 1, False)
    assert relative_error(raw.cpu(), reference_sums(a, w, exponents, ids, 1, False)) < TOLERANCE[torch.float32]


def test_the_tuning_offers_the_mma_tiles_for_one_token_of_mxfp4_experts_only():
    """One-token MXFP4 buckets time each MMA tile beside the GEMVs (named by SPLIT and UNROLL); blocks of rows and
    float experts do not."""
    from custom_ops.moe.tuning import MoeGroupedGemmTuning

    tuning = MoeGroupedGemmTuning()
    bucket = {"experts": 32, "n": 5760, "k": 2880, "gated": True, "fp8": False, "top_k": 4, "rows": 1, "mxfp4": True}
    names = [candidate.name for candidate in tuning.candidates(bucket)]
    assert [n for n in names if n.startswith("mma")] == ["mma-s2-u5", "mma-s2-u3", "mma-s1-u5", "mma-s1-u9"]
    assert names[0] == "n64-k64-s3-w4" and "gemv-n16-k256-s3-w4" in names  # the fallback first; the heuristic's GEMV
    for other in ({**bucket, "rows": 16}, {k: v for k, v in bucket.items() if k != "mxfp4"}):
        assert not any(candidate.name.startswith("mma") for candidate in tuning.candidates(other))


def test_a_call_the_kernel_does_not_take_is_refused_with_its_shapes():
    """CPU rows (no GPU kernel), and N off the 16-channel programs: a ValueError naming the rows and the bytes."""
    w, exponents = random_mxfp4(2, 32, 64)
    with pytest.raises(ValueError, match=r"does not take rows \[1, 64\] torch.bfloat16 on cpu with bytes \[2, 32, 32\]"):
        gluon_mxfp4.experts_mma(torch.randn(1, 64).bfloat16(), w, exponents, torch.tensor([0, 1]), 2, True)
    assert gluon_mxfp4.launch_for(torch.randn(1, 64), *random_mxfp4(2, 24, 64)) is None
