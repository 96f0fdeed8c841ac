"""compiled_llm::int8_weight_linear (custom_ops/linear/int8_weight.py): 8-bit codes with group scales and offsets
(W8A16, GGUF's Q5_K/Q6_K/Q8_0): the reference against float64, and the Triton kernel against the reference in
Triton's interpreter on CPU (float32, float16) and on the GPU (bfloat16, float16)."""

import pytest
import torch
from conftest import relative_error, run_in_interpreter

from custom_ops.linear.int8_weight import dequantize, int8_weight_linear_reference
from custom_ops.triton_runtime import triton_available

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_operands(n: int, k: int, group: int, offsets: bool, dtype, generator) -> tuple:
    codes = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
    scales = (torch.rand(n, k // group, generator=generator) * 0.01).to(dtype)
    shifts = (torch.randn(n, k // group, generator=generator) * 0.1).to(dtype) if offsets else None
    return codes, scales, shifts


def test_a_hand_worked_weight():
    """Two groups of 16 columns, one output channel: w = q s + m per group."""
    codes = torch.tensor([[1] * 16 + [-2] * 16], dtype=torch.int8)
    weight = dequantize(codes, torch.tensor([[0.5, 0.25]]), torch.tensor([[1.0, -1.0]]), 16)
    assert weight.tolist() == [[1.5] * 16 + [-1.5] * 16]
    assert dequantize(codes, torch.tensor([[0.5, 0.25]]), None, 16).tolist() == [[0.5] * 16 + [-0.5] * 16]


def test_the_reference_matches_float64():
    generator = torch.Generator().manual_seed(0)
    codes, scales, offsets = random_operands(24, 128, 32, True, torch.float32, generator)
    x, bias = torch.randn(2, 3, 128, generator=generator), torch.randn(24, generator=generator)
    expected = x.double() @ dequantize(codes, scales, offsets, 32).double().t() + bias.double()
    actual = torch.ops.compiled_llm.int8_weight_linear(x, codes, scales, offsets, bias, 32, "torch")
    assert actual.shape == (2, 3, 24) and relative_error(actual, expected) < 1e-6


def check_triton_against_reference(device: str, dtype: torch.dtype) -> None:
    """The `triton` backend for one row (a decode step) and more, groups of 16 (Q6_K), 32 (Q8_0, Q5_K) and 64, with
    and without offsets and a bias, on shapes that leave partial tiles."""
    generator = torch.Generator().manual_seed(1)
    for n, k, group, rows, offsets in ((40, 256, 32, 1, False), (48, 512, 16, 5, True), (40, 256, 32, 70, True),
                                       (24, 128, 64, 3, False), (96, 512, 16, 1, False)):  # fmt: skip
        operands = [
            None if t is None else t.to(device) for t in random_operands(n, k, group, offsets, dtype, generator)
        ]
        x = torch.randn(rows, k, generator=generator).to(dtype).to(device)
        bias = torch.randn(n, generator=generator).to(dtype).to(device)
        for b in (bias, None):
            expected = int8_weight_linear_reference(x, *operands, b, group)
            actual = torch.ops.compiled_llm.int8_weight_linear(x, *operands, b, group, "triton")
            assert relative_error(actual.cpu(), expected.cpu()) < TOLERANCE[dtype], (n, k, group, rows, offsets)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_int8_weight_linear as t; "
        "t.check_triton_against_reference('cpu', torch.float32); t.check_triton_against_reference('cpu', torch.float16)"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_on_the_gpu(dtype):
    check_triton_against_reference("cuda", dtype)


def test_the_triton_backend_falls_back_to_the_reference_where_it_cannot_run():
    """On a CPU without the interpreter, or groups of 8 (below the K tile): the reference's result."""
    generator = torch.Generator().manual_seed(2)
    operands = random_operands(8, 64, 8, True, torch.float32, generator)
    x = torch.randn(3, 64, generator=generator)
    expected = int8_weight_linear_reference(x, *operands, None, 8)
    assert torch.equal(torch.ops.compiled_llm.int8_weight_linear(x, *operands, None, 8, "triton"), expected)
