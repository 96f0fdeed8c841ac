"""`compiled_llm::int8_weight_linear`: y = x @ W^T (+ b) with W stored as signed 8-bit codes and a float scale (and,
where given, an offset) per output channel and group of input columns, activations in the model's dtype (W8A16). It
carries GGUF's 5, 6 and 8-bit block formats moved into one layout (compiled_llm/gguf_blocks.py): Q8_0 (w = d q),
Q6_K (w = (d sc) (q - 32), groups of 16) and Q5_K (w = (d sc) q - dmin mn).

Numerics, which every backend is held to (tests/test_int8_weight_linear.py):
- `qweight` int8 [N, K]; `scales` [N, K/G] in a float dtype; `offsets` [N, K/G] in a float dtype, or None;
- W[n, k] = q[n, k] * s[n, k // G] (+ m[n, k // G]), in float32 (a product, then a sum, as gguf's dequantizer);
- y[t, n] = sum_k x[t, k] W[n, k] (+ b[n]), products and sums in float32, then the input's dtype.
The tensor-core kernel takes q exactly in x's dtype (|q| <= 128) and applies each group's scale to its float32 partial
sum, and the offset times the group's sum of x: backends differ from the reference by summation order only.

Backends by name: `torch` is the reference (any device); `triton` runs the 4-bit GEMM kernel of
triton_int4_kernels.py with CODES8 (a byte a code) for any number of rows (a decode row padded to the MMA's 16), the
reference where it does not take the shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from custom_ops.linear.int4 import dequantizing_backend
from custom_ops.triton_runtime import KERNEL_DTYPES, pdl_launch_options, triton_runs_on

Int8WeightLinearFn = Callable[..., torch.Tensor]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "int8_weight_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor? bias, int group_size, "
    "str backend) -> Tensor"
)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
               group_size: int) -> torch.Tensor:  # fmt: skip
    """W [N, K] in float32, as the numerics above define it."""
    n = qweight.shape[0]
    weight = qweight.reshape(n, -1, group_size).float() * scales.float().unsqueeze(-1)  # groups broadcast, no [N, K] copies
    return (weight if offsets is None else weight + offsets.float().unsqueeze(-1)).view(n, -1)


def int8_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                 offsets: torch.Tensor | None, bias: torch.Tensor | None,
                                 group_size: int) -> torch.Tensor:  # fmt: skip
    out = x.reshape(-1, x.shape[-1]).float() @ dequantize(qweight, scales, offsets, group_size).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def triton_takes(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bias: torch.Tensor | None, group_size: int) -> bool:  # fmt: skip
    """What the kernel reads: rows [M, K] with a unit last stride in a float dtype it writes, contiguous int8 codes
    [N, K], contiguous scales (and offsets) [N, K/G] in a float dtype, a bias [N] in the rows' dtype; groups of a
    power of 2 of at least 16 columns (the K tile divides them)."""
    n, k = qweight.shape
    return (
        k > 0 and rows.shape[-1] == k and rows.stride(-1) == 1 and triton_runs_on(rows) and rows.dtype in KERNEL_DTYPES
        and qweight.dtype == torch.int8 and qweight.is_contiguous() and group_size >= 16
        and group_size & (group_size - 1) == 0 and k % group_size == 0
        and scales.is_contiguous() and scales.dtype in KERNEL_DTYPES and tuple(scales.shape) == (n, k // group_size)
        and (offsets is None or (offsets.is_contiguous() and offsets.dtype in KERNEL_DTYPES
                                 and offsets.shape == scales.shape))
        and (bias is None or (bias.is_contiguous() and bias.shape == (n,) and bias.dtype == rows.dtype))
    )  # fmt: skip


def int8_weight_gemm(rows, qweight, scales, offsets, bias, group_size: int, **tile) -> torch.Tensor:
    """y [M, N] for rows [M, K] (triton_takes checked what the kernel reads)."""
    from custom_ops.linear.triton_int4 import four_bit_kernels, gemm_config, triton_cdiv

    m, n, k = rows.shape[0], qweight.shape[0], qweight.shape[1]
    launch = {**gemm_config(m, n, group_size), **tile}  # int4's tiles: the same kernel
    out = rows.new_empty(m, n)
    grid = (triton_cdiv(m, launch["BLOCK_M"]), triton_cdiv(n, launch["BLOCK_N"]))
    four_bit_kernels().int4_gemm_kernel[grid](
        rows, qweight, scales, offsets if offsets is not None else scales, rows, bias if bias is not None else rows,
        out, m, n, rows.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), n, n, K=k, GROUP=group_size,
        HAS_SMOOTH=False, HAS_BIAS=bias is not None, OFFSET=offsets is not None, CODES8=True, **launch,
        **pdl_launch_options(rows),
    )  # fmt: skip
    return out


def _triton_linear(x, qweight, scales, offsets, bias, group_size: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0 or not triton_takes(rows, qweight, scales, offsets, bias, group_size):
        return int8_weight_linear_reference(x, qweight, scales, offsets, bias, group_size)
    return int8_weight_gemm(rows, qweight, scales, offsets, bias, group_size).view(*x.shape[:-1], qweight.shape[0])


def int8_weight_backend(device: torch.device, linear_backend: str = "auto") -> tuple[str, str]:
    """The backend for a model on `device` under CompileConfig.linear_backend, and why."""
    kernels = "a Triton tensor-core GEMM that takes the 8-bit codes exactly, any number of rows"
    return dequantizing_backend(device, linear_backend, kernels)


INT8_WEIGHT_LINEAR_BACKENDS: dict[str, Int8WeightLinearFn] = {
    "torch": int8_weight_linear_reference,
    "triton": _triton_linear,
}


def _int8_weight_linear(x, qweight, scales, offsets, bias, group_size: int, backend: str) -> torch.Tensor:
    return INT8_WEIGHT_LINEAR_BACKENDS[backend](x, qweight, scales, offsets, bias, group_size)


def _int8_weight_linear_fake(x, qweight, scales, offsets, bias, group_size: int, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("int8_weight_linear", _int8_weight_linear, _device)
torch.library.register_fake("compiled_llm::int8_weight_linear", _int8_weight_linear_fake, lib=_LIBRARY)
