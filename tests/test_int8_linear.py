"""`compiled_llm::int8_linear` (custom_ops/linear/int8.py): the roundings, the reference against float64 over its own
integers, and the `int_mm` backend (torch._int_mm) against the reference on CPU and GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error

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
