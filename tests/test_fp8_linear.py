"""compiled_llm::fp8_linear's reference backend against float64: the quantization it does (per-channel weights,
per-token or static activations, e4m3) and the error that bounds, on fresh random inputs."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import run_in_interpreter
from fp8_rounding import CLIPS, amax_scale, clip_errors, e4m3

import custom_ops  # noqa: F401  (registers the ops)
from custom_ops.linear import fp8
from custom_ops.linear.fp8 import FP8, FP8_MAX, quantize_rows, quantize_weight
from custom_ops.triton_runtime import triton_available

HALF_ULP = 2.0**-4  # e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself, relatively
SUBNORMAL_STEP = 2.0**-9  # spacing of e4m3's subnormals (and of its smallest normals)


def rounding_bound(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """How far e4m3(values / scale) * scale may be from values (float64)."""
    return HALF_ULP * values.abs() + SUBNORMAL_STEP / 2 * scale


@pytest.mark.parametrize("shape", [(96, 40), (7, 256)])
def test_weights_round_per_output_channel(shape):
    weight = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[0], 1, dtype=torch.float64) * 3
    weight8, scale = quantize_weight(weight)
    assert weight8.dtype == FP8 and scale.shape == (shape[0],) and scale.dtype == torch.float32
    # Each channel's scale is its amax / 448 times one of the clips, the one nearest the channel (fp8_rounding):
    # the least float64 error, up to the float32 sums the op ranks them by.
    amax = weight.abs().amax(dim=1)
    clip = scale.double() * FP8_MAX / amax
    assert torch.isclose(clip[:, None], torch.tensor(CLIPS, dtype=torch.float64), rtol=1e-6).any(dim=1).all()
    error = (weight8.double() * scale.double()[:, None] - weight).abs()
    assert (error.square().sum(1) <= clip_errors(weight).amin(dim=1) * (1 + 1e-5)).all()
    inside = weight.abs() <= FP8_MAX * scale.double()[:, None]  # the rest saturate at +-448 * s_w
    assert (error[inside] <= rounding_bound(weight, scale.double()[:, None])[inside]).all()
    assert torch.allclose(error[~inside], weight.abs()[~inside] - FP8_MAX * scale.double()[:, None].expand_as(weight)[~inside])
    # The search rounds no channel worse than amax's scale alone, and the whole weight better.
    unclipped = e4m3(weight, amax_scale(weight))
    assert (error.square().sum(1) <= (unclipped - weight).square().sum(1) * (1 + 1e-6)).all()
    assert error.square().sum() < (unclipped - weight).square().sum()


def test_weights_are_searched_in_chunks_of_rows(monkeypatch):
    weight = torch.randn(37, 24)
    whole = quantize_weight(weight)
    monkeypatch.setattr(fp8, "_SEARCH_CHUNK_VALUES", 24 * 5)  # 5 rows a chunk, the last one short
    chunked = quantize_weight(weight)
    assert torch.equal(whole[0].view(torch.uint8), chunked[0].view(torch.uint8)) and torch.equal(whole[1], chunked[1])
    zero8, zero_scale = quantize_weight(torch.zeros(3, 8))  # an all-zero channel: zeros and a finite scale
    assert (zero8.float() == 0).all() and torch.isfinite(zero_scale).all() and (zero_scale > 0).all()


def test_activations_round_per_token_or_with_the_static_scale():
    rows = torch.randn(12, 64) * torch.logspace(-2, 2, 12)[:, None]  # rows of very different sizes
    rows8, scale = quantize_rows(rows)
    torch.testing.assert_close(scale.double(), rows.double().abs().amax(dim=1, keepdim=True) / FP8_MAX, rtol=1e-6, atol=0)
    assert ((rows8.double() * scale.double() - rows.double()).abs() <= rounding_bound(rows.double(), scale.double())).all()
    static = torch.tensor(rows.abs().max().item() / FP8_MAX)
    rows8, scale = quantize_rows(rows, static)
    assert (scale == static).all()
    assert ((rows8.double() * static.double() - rows.double()).abs() <= rounding_bound(rows.double(), static.double())).all()
    saturated, _ = quantize_rows(rows, static / 4)  # a static scale too small saturates, never inf or nan
    assert saturated.double().abs().max() == FP8_MAX and torch.isfinite(saturated.double()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_the_op_is_within_the_rounding_bound_of_the_float64_product(dtype, bias):
    """|y - x W^T| <= sum_k |x_k| |W_nk| (2 * 2^-4 + 2^-8) + the output's own rounding: what rounding both operands
    to e4m3 can cost, checked against the exact product of the unquantized inputs."""
    x = torch.randn(3, 5, 128).to(dtype)
    weight = torch.randn(48, 128)
    b = torch.randn(48).to(dtype) if bias else None
    weight8, scale = quantize_weight(weight)
    y = torch.ops.compiled_llm.fp8_linear(x, weight8, scale, None, b, "torch")
    assert y.shape == (3, 5, 48) and y.dtype == dtype
    x64 = x.double()
    exact = x64 @ weight.double().t() + (b.double() if bias else 0)
    slack = x64.abs() @ weight.double().abs().t() * (2 * HALF_ULP + HALF_ULP**2) + 1e-4
    output_rounding = exact.abs() * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-23) * 2
    assert ((y.double() - exact).abs() <= slack + output_rounding).all()
    # ... and exactly the composition the op defines, computed here in float64 from its quantized operands.
    rows8, row_scale = quantize_rows(x.reshape(-1, 128))
    composed = (rows8.double() @ weight8.double().t()) * row_scale.double() * scale.double()
    composed = (composed + (b.double() if bias else 0)).reshape(3, 5, 48)
    torch.testing.assert_close(y.double(), composed, rtol=2.0**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_zero_rows_and_channels_give_zeros():
    x = torch.randn(4, 32)
    x[1] = 0
    weight = torch.randn(8, 32)
    weight[3] = 0
    weight8, scale = quantize_weight(weight)
    y = torch.ops.compiled_llm.fp8_linear(x, weight8, scale, None, None, "torch")
    assert torch.isfinite(y).all() and (y[1] == 0).all() and (y[:, 3] == 0).all()


def check_backend_against_reference(backend: str, device: str, dtype: torch.dtype, seed: int) -> None:
    """Fresh random shapes (multiples of 16, which the GEMM takes, and others, which fall back), per-token and
    static scales, with and without bias: equal to the reference up to summation order and output rounding."""
    generator = torch.Generator().manual_seed(seed)
    for rows, k, n in ((1, 64, 48), (5, 128, 32), (64, 256, 128), (3, 40, 24)):
        x = (torch.randn(rows, k, generator=generator) * 3).to(device, dtype)
        weight8, scale = quantize_weight(torch.randn(n, k, generator=generator).to(device))
        for input_scale in (None, x.float().abs().max() / FP8_MAX):
            for bias in (None, torch.randn(n, generator=generator).to(device, dtype)):
                args = (x, weight8, scale, input_scale, bias)
                expected = torch.ops.compiled_llm.fp8_linear(*args, "torch")
                actual = torch.ops.compiled_llm.fp8_linear(*args, backend)
                assert actual.dtype == dtype and actual.shape == expected.shape
                # Sums in another order (float32), and the bias added in the output's dtype (bf16).
                tolerance = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance,
                                           atol=tolerance * expected.float().abs().max().item())  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_backend_matches_the_reference_on_cpu(dtype):
    check_backend_against_reference("scaled_mm", "cpu", dtype, seed=torch.seed() % 2**31)


@pytest.mark.gpu
def test_scaled_mm_backend_matches_the_reference_on_gpu():
    for _ in range(3):  # fresh inputs each run
        check_backend_against_reference("scaled_mm", "cuda", torch.bfloat16, seed=torch.seed() % 2**31)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_triton_backend_matches_the_reference_on_gpu():
    """The quantizing kernel before the decode GEMM (up to 64 rows) or cuBLASLt (more), per-token and static
    scales, on fresh inputs."""
    for _ in range(3):
        check_backend_against_reference("triton", "cuda", torch.bfloat16, seed=torch.seed() % 2**31)
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, k, n in ((1, 4096, 6144), (1, 14336, 512), (3, 576, 960), (16, 1000, 72), (33, 4096, 256), (80, 4096, 256)):
        x = (torch.randn(rows, k, generator=generator) * 2).to("cuda", torch.bfloat16)
        weight8, scale = quantize_weight(torch.randn(n, k, generator=generator).to("cuda"))
        bias = torch.randn(n, generator=generator).to("cuda", torch.bfloat16)
        for input_scale in (None, x.float().abs().max() / FP8_MAX):
            expected = torch.ops.compiled_llm.fp8_linear(x, weight8, scale, input_scale, bias, "torch").float()
            actual = torch.ops.compiled_llm.fp8_linear(x, weight8, scale, input_scale, bias, "triton")
            torch.testing.assert_close(actual.float(), expected, rtol=2.0**-7, atol=2.0**-7 * expected.abs().max().item())
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_triton_quantize_rows_rounds_as_the_reference_bit_for_bit():
    from custom_ops.linear import triton_w8a8

    rows = (torch.randn(37, 4096, device="cuda") * torch.logspace(-3, 3, 37, device="cuda")[:, None]).bfloat16()
    for input_scale in (None, rows.float().abs().max() / FP8_MAX / 2):  # the static one also saturates
        quantized, scale = triton_w8a8.quantize_rows(rows, input_scale)
        expected, expected_scale = quantize_rows(rows, input_scale)
        assert torch.equal(scale, expected_scale)
        assert torch.equal(quantized.view(torch.uint8), expected.view(torch.uint8))


# Tiles of the decode GEMM beside its default (64 x 256, wgmma): mma.sync tiles (16, 32 rows), deep and shallow
# pipelines, each with and without a K remainder in the shapes below.
DECODE_TILES = (
    {},
    {"BLOCK_N": 16, "BLOCK_K": 256, "num_stages": 3},
    {"BLOCK_N": 32, "BLOCK_K": 512, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 3, "num_warps": 8},
    {"PREFETCH": 2},  # L2 prefetches of the first two tiles before the PDL wait
    {"SPLIT_K": 2},  # K split in halves, the last program of a tile adding the partial sums
    {"SPLIT_K": 3, "PREFETCH": 1},  # a split whose last share of K is short (masked loads)
    {"SPLIT_K": 4, "BLOCK_K": 128},
)


def check_decode_gemm(device: str, tile: dict, shapes) -> None:
    """The tensor-core decode GEMM at `tile` over rows quantized beforehand, (rows, K, N) each of `shapes`, with and
    without a bias, against the reference on fresh inputs: within one rounding of the bfloat16 output."""
    from custom_ops.linear import triton_decode_gemm

    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, k, n in shapes:
        x = (torch.randn(rows, k, generator=generator) * 2).to(device, torch.bfloat16)
        weight8, scale = quantize_weight(torch.randn(n, k, generator=generator).to(device))
        x8, x_scale = quantize_rows(x)
        for bias in (None, torch.randn(n, generator=generator).to(device, torch.bfloat16)):
            expected = torch.ops.compiled_llm.fp8_linear_quantized(x8, x_scale, weight8, scale, bias, torch.bfloat16, "torch")
            actual = triton_decode_gemm.decode_gemm(x8, weight8, bias, torch.bfloat16, x_scale, scale, **tile)
            assert actual.shape == expected.shape and actual.dtype == torch.bfloat16
            torch.testing.assert_close(actual.float(), expected.float(), rtol=2.0**-7,
                                       atol=2.0**-7 * expected.float().abs().max().item())  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("tile", DECODE_TILES, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()) or "default")
def test_w8a8_decode_gemm_matches_the_reference_on_gpu(tile):
    """From 1 to 64 rows (x padded to 16, 32 or 64), K and N multiples of the tiles or not."""
    shapes = ((1, 4096, 6144), (16, 14336, 512), (3, 1000, 200), (7, 576, 960), (20, 4096, 256), (64, 1000, 320))
    check_decode_gemm("cuda", tile, shapes)
    torch.cuda.synchronize()


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_decode_gemm_in_the_interpreter():
    """Small shapes (a K remainder, each row padding) at the default tile and two splits (no L2 prefetch: inline PTX
    does not run in the interpreter)."""
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import test_fp8_linear as t\n"
        "for tile in ({}, {'SPLIT_K': 2, 'BLOCK_K': 128}, {'BLOCK_N': 16, 'BLOCK_K': 64, 'SPLIT_K': 3}):\n"
        "    t.check_decode_gemm('cpu', tile, ((1, 256, 64), (7, 300, 40), (20, 512, 96), (64, 100, 16)))"
    )


def test_the_decode_gemm_refuses_what_it_cannot_take_before_launching():
    """Rows beyond what x can be padded to, and L2 prefetches with tiles that are not whole 128-byte lines, are
    errors naming the limit (checked on the host: no GPU needed)."""
    pytest.importorskip("triton")
    from custom_ops.linear import triton_decode_gemm

    weight8, scale = quantize_weight(torch.randn(32, 256))
    limit = triton_decode_gemm.MAX_ROWS
    x8, x_scale = quantize_rows(torch.randn(limit + 1, 256))
    one_row = functools.partial(triton_decode_gemm.decode_gemm, x8[:1], weight8, None, torch.bfloat16, x_scale[:1], scale)
    with pytest.raises(ValueError, match=f"1 to {limit} rows, got {limit + 1}"):
        triton_decode_gemm.decode_gemm(x8, weight8, None, torch.bfloat16, x_scale, scale)
    with pytest.raises(ValueError, match="PREFETCH takes BLOCK_K in whole 128-byte lines"):
        one_row(BLOCK_K=64, PREFETCH=1)
    with pytest.raises(ValueError, match=r"SPLIT_K takes an integer >= 1, got 0"):
        one_row(SPLIT_K=0)
    with pytest.raises(ValueError, match=r"unknown tile entries \['BLOCK_M'\]"):
        one_row(BLOCK_M=16)
    with pytest.raises(ValueError, match="float8_e4m3fn operands take both scales"):
        triton_decode_gemm.decode_gemm(x8[:1], weight8, None, torch.bfloat16)
    x16, weight16 = torch.randn(2, 256, dtype=torch.bfloat16), torch.randn(64, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="silu_mul takes 16-bit operands without a split of K"):
        triton_decode_gemm.decode_gemm(x16, weight16, None, torch.bfloat16, silu_mul=True, SPLIT_K=2)


@pytest.mark.gpu
def test_split_k_decode_gemm_replays_in_cuda_graphs():
    """Split calls captured in two graphs, the second captured last and replayed first, then each replayed again on
    new rows: every output right each time (no arrival count outlives its call)."""
    from custom_ops.linear import triton_decode_gemm

    weight8, scale = quantize_weight(torch.randn(320, 3000, device="cuda"))
    xs = [quantize_rows(torch.randn(rows, 3000, device="cuda", dtype=torch.bfloat16)) for rows in (5, 40)]
    graphs, outs = [], []
    for x8, x_scale in xs:
        triton_decode_gemm.decode_gemm(x8, weight8, None, torch.bfloat16, x_scale, scale, SPLIT_K=4)  # compiled outside
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(triton_decode_gemm.decode_gemm(x8, weight8, None, torch.bfloat16, x_scale, scale, SPLIT_K=4))
        graphs.append(graph)
    for _ in range(3):
        for i in (1, 0):
            x8, x_scale = xs[i]
            new8, new_scale = quantize_rows(torch.randn(x8.shape[0], 3000, device="cuda", dtype=torch.bfloat16))
            x8.copy_(new8)
            x_scale.copy_(new_scale)
            graphs[i].replay()
            expected = torch.ops.compiled_llm.fp8_linear_quantized(x8, x_scale, weight8, scale, None, torch.bfloat16,
                                                                   "torch")  # fmt: skip
            torch.testing.assert_close(outs[i].float(), expected.float(), rtol=2.0**-7,
                                       atol=2.0**-7 * expected.float().abs().max().item())  # fmt: skip