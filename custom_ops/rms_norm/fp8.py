"""`compiled_llm::add_rms_norm_fp8`: add_rms_norm whose output goes straight to FP8 linears, written as their
activations: (x8, s_x, h) = (quantize_rows(rms_norm(x + r, w)), x + r), the norm's output rounded to x's dtype
first, exactly as `add_rms_norm` then `fp8_linear`'s per-token quantization compute it (fp8.scale_and_round).

The `triton` backend is add_rms_norm's kernel with its QUANTIZED_OUT epilogue (rms_norm/triton_kernel.py): one
kernel, which writes 1 byte a value and a scale a row instead of the bf16 output, and spares each linear its own pass
over x. `torch` is the reference.
"""

from __future__ import annotations

import torch

from custom_ops.linear.fp8 import FP8, quantize_rows
from custom_ops.rms_norm.op import _add_rms_norm, _launch, _out_dtype, _rows, _triton_usable

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "add_rms_norm_fp8(Tensor x, Tensor residual, Tensor weight, float eps, str backend) -> (Tensor, Tensor, Tensor)"
)


def add_rms_norm_fp8_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    normed, total = _add_rms_norm(x, residual, weight, eps, "torch")
    quantized, scale = quantize_rows(normed.reshape(-1, x.shape[-1]))
    return quantized.view(x.shape), scale.view(*x.shape[:-1], 1), total


def _add_rms_norm_fp8(x, residual, weight, eps: float, backend: str):
    same_dtype = _out_dtype(x, weight) == x.dtype  # the kernel rounds the output to x's dtype before quantizing it
    if backend == "torch" or not (_triton_usable(x) and weight.is_contiguous() and same_dtype):
        return add_rms_norm_fp8_reference(x, residual, weight, eps)
    x2d, r2d = _rows(x), _rows(residual)
    quantized = torch.empty(x2d.shape, dtype=FP8, device=x.device)
    scale = torch.empty(x2d.shape[0], 1, dtype=torch.float32, device=x.device)
    total = torch.empty_like(x2d)
    _launch(x2d, r2d, weight, eps, quantized, total, scale)
    return quantized.view(x.shape), scale.view(*x.shape[:-1], 1), total.view(x.shape)


def _add_rms_norm_fp8_fake(x, residual, weight, eps, backend):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32), x.new_empty(x.shape)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("add_rms_norm_fp8", _add_rms_norm_fp8, _device)
torch.library.register_fake("compiled_llm::add_rms_norm_fp8", _add_rms_norm_fp8_fake, lib=_LIBRARY)
