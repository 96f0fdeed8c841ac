"""`compiled_llm::int8_linear` (custom_ops/linear/int8.py): the roundings, the reference against float64 over its own
integers, the `int_mm` backend (torch._int_mm) and the `triton` backend (one quantizing kernel, the decode GEMM with
int32 sums, torch._int_mm for more rows) against the reference on CPU (the interpreter) and GPU, and
`int8_linear_quantized` over rows quantized beforehand."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error, run_in_interpreter

from custom_ops.linear.int8 import int8_linear_reference, quantize_rows, quantize_weight


def test_weights_round_per_output_channel_within_half_a_step():
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    weight8, scale = quantize_weight(weight)
    assert weight8.dtype == torch.int8 and weight8.abs().max() == 127
    error = (weight8.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert torch.allclose(scale, weight.abs().amax(dim=1) / 127)


def test_rows_round_per_token_after_the_smooth():
    generator = torch.Generator().manual_seed(1)
    x, smooth = torch.randn(3, 64, generator=generator), torch.rand(64, generator=generator) + 0.5
    rows8, scale = quantize_rows(x, smooth)
    assert torch.allclose(scale.view(-1), (x * smooth).abs().amax(dim=1) / 127)
    assert ((rows8.float() * scale - x * smooth).abs() <= scale / 2 + 1e-7).all()


def test_the_reference_is_its_integers_product_scaled():
    """y = (x8 . W8) s_x s_w + b: the integer sums exact, against float64."""
    generator = torch.Generator().manual_seed(2)
    x, weight, bias = (
        torch.randn(2, 5, 128, generator=generator),
        torch.randn(40, 128, generator=generator),
        torch.randn(40),
    )
    smooth = torch.rand(128, generator=generator) + 0.5
    weight8, weight_scale = quantize_weight(weight, smooth)
    out = torch.ops.compiled_llm.int8_linear(x, weight8, weight_scale, smooth, bias, "torch")
    rows8, row_scale = quantize_rows(x.reshape(-1, 128), smooth)
    expected = (rows8.double() @ weight8.double().t()) * row_scale.double() * weight_scale.double() + bias.double()
    assert out.shape == (2, 5, 40) and relative_error(out.reshape(-1, 40), expected) < 1e-6
    assert relative_error(out, x @ weight.t() + bias) < 0.02  # 8 bits each side: ~1% of the product


def test_zero_rows_and_channels_give_zeros():
    weight = torch.randn(16, 32)
    weight[3] = 0
    x = torch.randn(4, 32)
    x[1] = 0
    out = int8_linear_reference(x, *quantize_weight(weight), None, None)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[:, 3] == 0).all()


def check_int_mm_against_reference(device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    for rows, n, k in ((1, 64, 128), (5, 48, 256), (40, 64, 64), (3, 20, 64)):  # N = 20: not a multiple of 8
        weight = torch.randn(n, k, generator=generator)
        smooth = torch.rand(k, generator=generator) + 0.5
        weight8, weight_scale = (t.to(device) for t in quantize_weight(weight, smooth))
        x = torch.randn(rows, k, generator=generator).to(device, dtype)
        bias = torch.randn(n, generator=generator).to(device, dtype)
        args = (x, weight8, weight_scale, smooth.to(device), bias)
        expected = int8_linear_reference(*args)
        actual = torch.ops.compiled_llm.int8_linear(*args, "int_mm")
        assert torch.equal(actual, expected), (rows, n, k)  # the same integers, scaled by the same ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_mm_backend_matches_the_reference_on_cpu(dtype):
    check_int_mm_against_reference("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_mm_backend_matches_the_reference_on_gpu(dtype):
    check_int_mm_against_reference("cuda", dtype)


def check_triton_against_reference(device: str, dtype: torch.dtype) -> None:
    """Bit for bit: the same int8 rows (the kernel rounds as quantize_rows does), exact integer sums, and the scales
    applied in the reference's order. Rows up to the decode GEMM's 64 and past it (torch._int_mm); split K; N not a
    multiple of the tile; without a smooth or a bias; int8_linear_quantized over the same rows."""
    from custom_ops.linear import triton_decode_gemm, triton_w8a8

    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, n, k, with_smooth in ((1, 96, 256, True), (7, 40, 512, False), (64, 64, 128, True), (70, 48, 64, True)):
        weight = torch.randn(n, k, generator=generator)
        smooth = (torch.rand(k, generator=generator) + 0.5) if with_smooth else None
        weight8, weight_scale = (t.to(device) for t in quantize_weight(weight, smooth))
        smooth = smooth.to(device) if smooth is not None else None
        x = (torch.randn(rows, k, generator=generator) * torch.logspace(-2, 2, rows)[:, None]).to(device, dtype)
        bias = torch.randn(n, generator=generator).to(device, dtype) if with_smooth else None
        expected = int8_linear_reference(x, weight8, weight_scale, smooth, bias)
        actual = torch.ops.compiled_llm.int8_linear(x, weight8, weight_scale, smooth, bias, "triton")
        assert torch.equal(actual, expected), (rows, n, k, (actual.float() - expected.float()).abs().max())
        rows8, row_scale = triton_w8a8.quantize_rows(x, None, smooth, torch.int8)
        expected8, expected_scale = quantize_rows(x, smooth)
        assert torch.equal(rows8, expected8) and torch.equal(row_scale, expected_scale)
        quantized = torch.ops.compiled_llm.int8_linear_quantized(rows8, row_scale, weight8, weight_scale, bias, dtype,
                                                                  "triton")  # fmt: skip
        assert torch.equal(quantized, expected)
        if rows <= triton_decode_gemm.MAX_ROWS:
            split = triton_decode_gemm.decode_gemm(rows8, weight8, bias, dtype, row_scale, weight_scale, BLOCK_N=16,
                                                   BLOCK_K=64, SPLIT_K=2)  # fmt: skip
            assert torch.equal(split, expected)


def test_triton_backend_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_int8_linear as t; "
        "t.check_triton_against_reference('cpu', torch.float32); t.check_triton_against_reference('cpu', torch.float16)"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backend_on_the_gpu(dtype):
    check_triton_against_reference("cuda", dtype)


@pytest.mark.gpu
def test_every_int8_decode_gemm_tile_matches_the_reference_on_the_gpu():
    """Each tile the int8 decode GEMM's tuning may pick (decode_gemm_tuning.TILES: wgmma and mma.sync tiles, split K),
    bit for bit against the reference at 1, 16 and 64 rows, with a bias and a K remainder."""
    from custom_ops.linear import decode_gemm_tuning, triton_decode_gemm

    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    n, k = 192, 1088  # K not a multiple of any tile's
    weight8, weight_scale = (t.cuda() for t in quantize_weight(torch.randn(n, k, generator=generator)))
    bias = torch.randn(n, generator=generator).to("cuda", torch.bfloat16)
    for rows in (1, 16, 64):
        x = torch.randn(rows, k, generator=generator).to("cuda", torch.bfloat16)
        rows8, row_scale = quantize_rows(x, None)
        expected = int8_linear_reference(x, weight8, weight_scale, None, bias)
        for tile in decode_gemm_tuning.TILES:
            actual = triton_decode_gemm.decode_gemm(rows8, weight8, bias, torch.bfloat16, row_scale, weight_scale,
                                                    **tile)  # fmt: skip
            assert torch.equal(actual, expected), (rows, tile)
