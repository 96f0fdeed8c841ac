"""compiled_llm::fp8_block_linear against float64: 128 x 128 weight blocks, per-token 1 x 128 activation groups,
each group's partial sum scaled before the next is added (custom_ops/linear/fp8_block.py), on fresh random inputs,
with blocks cut short where the sizes are not multiples of 128."""

from __future__ import annotations

import pytest
import torch

import custom_ops  # registers the ops (and custom_ops.linear.fp8 below)
from custom_ops.linear.fp8 import FP8_MAX
from custom_ops.linear.fp8_block import quantize_row_groups, quantize_weight_blocks

HALF_ULP, SUBNORMAL_STEP = 2.0**-4, 2.0**-9  # as tests/test_fp8_linear.py


def block_amax(values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """amax of each rows x cols block of a 2-D tensor, the last ones cut short, by explicit loops (float64)."""
    n, k = values.shape
    return torch.tensor([[values[i : i + rows, j : j + cols].abs().max().item() for j in range(0, k, cols)]
                         for i in range(0, n, rows)], dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize("shape", [(256, 384), (300, 200)])
def test_weights_round_per_128_block(shape):
    weight = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[0], 1, dtype=torch.float64) * 3
    weight8, scale = quantize_weight_blocks(weight)
    assert weight8.shape == shape and weight8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    torch.testing.assert_close(scale.double(), block_amax(weight, 128, 128) / FP8_MAX, rtol=1e-6, atol=0)
    per_element = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert block_amax(weight8.double(), 128, 128).eq(FP8_MAX).all()  # each block's largest value is +-448
    error = (weight8.double() * per_element - weight).abs()
    assert (error <= HALF_ULP * weight.abs() + SUBNORMAL_STEP / 2 * per_element).all()


def test_activations_round_per_token_and_128_columns():
    rows = torch.randn(6, 300) * torch.logspace(-2, 2, 300)[None, :]  # groups of very different sizes
    rows8, scale = quantize_row_groups(rows)
    assert scale.shape == (6, 3)
    torch.testing.assert_close(scale.double(), block_amax(rows.double(), 1, 128) / FP8_MAX, rtol=1e-6, atol=0)
    per_element = scale.double().repeat_interleave(128, 1)[:, :300]
    error = (rows8.double() * per_element - rows.double()).abs()
    assert (error <= HALF_ULP * rows.double().abs() + SUBNORMAL_STEP / 2 * per_element).all()


def composed(x: torch.Tensor, weight8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op's definition in float64 from its quantized operands: y = sum_j s_x[:, j] s_w[n // 128, j] (x8_j . W8_j)."""
    rows8, row_scale = quantize_row_groups(x.reshape(-1, x.shape[-1]))
    k = weight8.shape[1]
    out = 0
    for j, start in enumerate(range(0, k, 128)):
        partial = rows8[:, start : start + 128].double() @ weight8[:, start : start + 128].double().t()
        out = out + partial * row_scale[:, j : j + 1].double() * scale[:, j].double().repeat_interleave(128)[: weight8.shape[0]]
    return out + (bias.double() if bias is not None else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_is_the_definition_and_within_the_rounding_bound(dtype):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = (torch.randn(7, 300, generator=generator) * 3).to(dtype)
    weight = torch.randn(200, 300, generator=generator)
    bias = torch.randn(200, generator=generator).to(dtype)
    weight8, scale = quantize_weight_blocks(weight)
    y = torch.ops.compiled_llm.fp8_block_linear(x, weight8, scale, bias, "torch")
    assert y.shape == (7, 200) and y.dtype == dtype
    tolerance = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    expected = composed(x, weight8, scale, bias)
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    x64 = x.double()
    exact = x64 @ weight.double().t() + bias.double()
    slack = x64.abs() @ weight.double().abs().t() * (2 * HALF_ULP + HALF_ULP**2) + 1e-3
    assert ((y.double() - exact).abs() <= slack + exact.abs() * 2 * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-23)).all()


def test_block_scales_keep_a_small_block_accurate_beside_a_large_one():
    """What blocks are for: with one scale per channel, columns 1e5 times smaller than the row's largest fall
    below e4m3's normal range (2^-6 of its largest) and round to a few subnormal steps; in a block of their own
    they keep e4m3's relative precision."""
    weight = torch.randn(128, 256)
    weight[:, 128:] *= 1e-5
    x = torch.randn(4, 256)
    x[:, :128] = 0  # only the small block counts
    exact = x @ weight.t()
    weight8, scale = quantize_weight_blocks(weight)
    blocked = torch.ops.compiled_llm.fp8_block_linear(x, weight8, scale, None, "torch")
    per_channel = torch.ops.compiled_llm.fp8_linear(x, *custom_ops.linear.fp8.quantize_weight(weight), None, None, "torch")
    assert (blocked - exact).norm() / exact.norm() < 0.06 and (per_channel - exact).norm() / exact.norm() > 0.2


@pytest.mark.gpu
def test_triton_backend_matches_the_reference_on_gpu():
    """The block-scaled Triton GEMM against the reference, decode and prefill row counts, sizes that are and are
    not multiples of 128, with and without bias, fresh inputs each run."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, k, n in ((1, 4096, 6144), (5, 576, 960), (16, 1536, 576), (77, 4096, 512), (300, 200, 300)):
        x = (torch.randn(rows, k, generator=generator) * 2).to("cuda", torch.bfloat16)
        weight8, scale = quantize_weight_blocks(torch.randn(n, k, generator=generator).to("cuda"))
        for bias in (None, torch.randn(n, generator=generator).to("cuda", torch.bfloat16)):
            expected = torch.ops.compiled_llm.fp8_block_linear(x, weight8, scale, bias, "torch").float()
            actual = torch.ops.compiled_llm.fp8_block_linear(x, weight8, scale, bias, "triton").float()
            torch.testing.assert_close(actual, expected, rtol=2.0**-7, atol=2.0**-7 * expected.abs().max().item())
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [{}, {"BLOCK_N": 16, "num_stages": 3}, {"BLOCK_N": 128, "num_stages": 4, "num_warps": 8}],
                         ids=["default", "n16", "n128"])  # fmt: skip
def test_the_decode_kernel_matches_the_reference_on_gpu(tile):
    """The swapped kernel of 1 to 16 rows (the weight as the MMA's wide operand) with other tiles than its default,
    on fresh inputs, K and N multiples of 128 and not."""
    from custom_ops.linear.triton_fp8_block import fp8_block_gemm

    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    for rows, k, n in ((1, 4096, 6144), (16, 14336, 512), (3, 1000, 200), (7, 576, 960)):
        x = (torch.randn(rows, k, generator=generator) * 2).to("cuda", torch.bfloat16)
        weight8, scale = quantize_weight_blocks(torch.randn(n, k, generator=generator).to("cuda"))
        for bias in (None, torch.randn(n, generator=generator).to("cuda", torch.bfloat16)):
            expected = torch.ops.compiled_llm.fp8_block_linear(x, weight8, scale, bias, "torch").float()
            actual = fp8_block_gemm(x, weight8, scale, bias, swapped=True, **tile).float()
            torch.testing.assert_close(actual, expected, rtol=2.0**-7, atol=2.0**-7 * expected.abs().max().item())
    torch.cuda.synchronize()
