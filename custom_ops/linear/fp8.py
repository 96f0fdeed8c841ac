"""`compiled_llm::fp8_linear`: y = x @ W^T (+ b) with W stored in float8 e4m3 and x quantized to it too (W8A8).

Numerics, which every backend is held to (tests/test_fp8_linear.py):
- the weight, once, per output channel: s_w[n] = max|W[n, :]| / 448, W8 = e4m3(W / s_w), rounded to nearest;
- the activation, per call: per token (row) by default, s_x[t] = max|x[t, :]| / 448 (`activation_scheme
  ="dynamic"`), or one calibrated scale (`input_scale`, `"static"`); x8 = e4m3(clamp(x / s_x, +-448));
- y[t, n] = (sum_k x8[t, k] W8[n, k]) s_x[t] s_w[n] (+ b[n]), products and sums in float32, then the input's
  dtype. A product of two e4m3 values is exact in float32, so backends differ only in summation order.

Backends by name, as `compiled_llm::linear`'s: `torch` is the reference (dequantized float32 matmul, any
device); `scaled_mm` runs `torch._scaled_mm` (cuBLASLt's FP8 GEMM with a scale per row and per column) where it
takes the shapes. A Triton kernel for decode rows (the GEMV seam) is next; each is tested against the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_AMAX = 1e-12  # an all-zero row or channel: a scale that divides without inf or nan

Fp8LinearFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, Tensor? bias, str backend) -> Tensor"
)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [n, k] e4m3, s_w [n] float32) of a weight [n, k], on its device."""
    scale = weight.detach().abs().amax(dim=1).float().clamp(min=MIN_AMAX) / FP8_MAX
    quantized = (weight.detach().float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def quantize_rows(rows: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [t, k] e4m3, s_x [t, 1] float32) of activations [t, k]: a scale per row, or the static one."""
    rows = rows.float()
    if input_scale is None:
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    else:
        scale = input_scale.float().reshape(1, 1).expand(rows.shape[0], 1)
    return (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    rows = x.reshape(-1, x.shape[-1])
    quantized, scale = quantize_rows(rows, input_scale)
    out = (quantized.float() @ weight.float().t()) * scale * weight_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _takes_scaled_mm(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes and dtypes `torch._scaled_mm` takes with a scale per row and per column: sizes in multiples of
    16 and, on a GPU, FP8 tensor cores (compute capability 8.9: Ada, Hopper and later) and a bf16 output."""
    k, n = weight.shape[1], weight.shape[0]
    if k % 16 or n % 16 or rows.shape[0] == 0 or not weight.is_contiguous():
        return False
    if rows.device.type == "cuda":
        return rows.dtype == torch.bfloat16 and _fp8_tensor_cores(rows.device.index)
    return rows.device.type == "cpu"


@functools.cache
def _fp8_tensor_cores(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """cuBLASLt's FP8 GEMM (on a CPU, oneDNN's) over the activations quantized here; where it does not take
    the shapes, the reference."""
    rows = x.reshape(-1, x.shape[-1])
    if not _takes_scaled_mm(rows, weight):
        return fp8_linear_reference(x, weight, weight_scale, input_scale, bias)
    quantized, scale = quantize_rows(rows, input_scale)
    out = torch._scaled_mm(quantized, weight.t(), scale_a=scale.contiguous(), scale_b=weight_scale.view(1, -1),
                           out_dtype=x.dtype)  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_backend(device: torch.device) -> tuple[str, str]:
    """The backend for a model on `device`, and why: `scaled_mm` where FP8 tensor cores run it, else the
    reference (on a CPU it is the faster: oneDNN's FP8 GEMM took 14 ms against 8 for [64, 1024] x [1024, 1024])."""
    if device.type == "cuda":
        if _fp8_tensor_cores(device.index):
            return "scaled_mm", "cuBLASLt's FP8 GEMM with row and column scales"
        return "torch", "no FP8 tensor cores before compute capability 8.9: the reference dequantizes"
    return "torch", f"the reference on {device.type}"


FP8_LINEAR_BACKENDS: dict[str, Fp8LinearFn] = {"torch": fp8_linear_reference, "scaled_mm": _scaled_mm_linear}


def _fp8_linear(x, weight, weight_scale, input_scale, bias, backend: str) -> torch.Tensor:
    return FP8_LINEAR_BACKENDS[backend](x, weight, weight_scale, input_scale, bias)


def _fp8_linear_fake(x, weight, weight_scale, input_scale, bias, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("fp8_linear", _fp8_linear, _device)
torch.library.register_fake("compiled_llm::fp8_linear", _fp8_linear_fake, lib=_LIBRARY)
