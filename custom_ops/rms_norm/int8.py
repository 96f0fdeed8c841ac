"""`compiled_llm::add_rms_norm_int8`: add_rms_norm whose output goes straight to an int8 linear (SmoothQuant, W8A8),
written as its activations: (x8, s_x, h) = (int8.quantize_rows(rms_norm(x + r, w), smooth), x + r), the norm's output
rounded to x's dtype first, exactly as `add_rms_norm` then `int8_linear`'s per-token quantization compute it.

The `triton` backend is add_rms_norm's kernel with its quantized epilogue (as add_rms_norm_fp8's, fp8.py): one kernel
writes 1 byte a value and a scale a row instead of the bf16 output, which spares the linear its own pass over x.
`torch` is the reference.
"""

from __future__ import annotations

import torch

from custom_ops.linear.int8 import quantize_rows
from custom_ops.rms_norm.op import _add_rms_norm, _launch, _out_dtype, _rows, _triton_usable

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "add_rms_norm_int8(Tensor x, Tensor residual, Tensor weight, Tensor? smooth, float eps, str backend) -> "
    "(Tensor, Tensor, Tensor)"
)


def add_rms_norm_int8_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                smooth: torch.Tensor | None, eps: float):  # fmt: skip
    normed, total = _add_rms_norm(x, residual, weight, eps, "torch")
    quantized, scale = quantize_rows(normed.reshape(-1, x.shape[-1]), smooth)
    return quantized.view(x.shape), scale.view(*x.shape[:-1], 1), total


def _add_rms_norm_int8(x, residual, weight, smooth, eps: float, backend: str):
    same_dtype = _out_dtype(x, weight) == x.dtype  # the kernel rounds the output to x's dtype before quantizing it
    smooth_ok = smooth is None or (
        smooth.dtype == torch.float32 and smooth.is_contiguous() and smooth.shape == weight.shape
    )
    if backend == "torch" or not (_triton_usable(x) and weight.is_contiguous() and same_dtype):
        return add_rms_norm_int8_reference(x, residual, weight, smooth, eps)
    if not smooth_ok:  # the norm's own kernel then the quantization: what the unfused graph computes
        normed, total = _add_rms_norm(x, residual, weight, eps, backend)
        quantized, scale = quantize_rows(normed.reshape(-1, x.shape[-1]), smooth)
        return quantized.view(x.shape), scale.view(*x.shape[:-1], 1), total
    x2d, r2d = _rows(x), _rows(residual)
    quantized = torch.empty(x2d.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2d.shape[0], 1, dtype=torch.float32, device=x.device)
    total = torch.empty_like(x2d)
    _launch(x2d, r2d, weight, eps, quantized, total, scale, smooth)
    return quantized.view(x.shape), scale.view(*x.shape[:-1], 1), total.view(x.shape)


def _add_rms_norm_int8_fake(x, residual, weight, smooth, eps, backend):
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(*x.shape[:-1], 1, dtype=torch.float32),
        x.new_empty(x.shape),
    )


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("add_rms_norm_int8", _add_rms_norm_int8, _device)
torch.library.register_fake("compiled_llm::add_rms_norm_int8", _add_rms_norm_int8_fake, lib=_LIBRARY)
