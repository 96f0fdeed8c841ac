"""`compiled_llm::silu_mul_int8`: a gated MLP's activation written as its down projection's int8 input (SmoothQuant,
W8A8): (x8, s_x) = int8.quantize_rows(silu(gate) * up, smooth) for gate_up = [gate | up], the activation rounded to
gate_up's dtype first, exactly as the activation then `int8_linear`'s per-token quantization compute it.

The `triton` backend is silu_mul_fp8's kernel writing int8 (triton_silu_mul_kernels.silu_mul_quantized_kernel): one
kernel where the activation and the down projection's quantizing kernel were two; `torch` is the reference.
"""

from __future__ import annotations

import torch

from custom_ops.linear.int8 import quantize_rows
from custom_ops.linear.op import silu_and_mul
from custom_ops.linear.triton_silu_mul import triton_silu_mul_quantized
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_runs_on

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define("silu_mul_int8(Tensor gate_up, Tensor? smooth, str backend) -> (Tensor, Tensor)")


def silu_mul_int8_reference(gate_up: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    activation = silu_and_mul(gate_up)
    quantized, scale = quantize_rows(activation.reshape(-1, activation.shape[-1]), smooth)
    return quantized.view(activation.shape), scale.view(*activation.shape[:-1], 1)


def _silu_mul_int8(gate_up: torch.Tensor, smooth: torch.Tensor | None, backend: str):
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    n = gate_up.shape[-1] // 2
    usable = triton_runs_on(gate_up) and gate_up.dtype in KERNEL_DTYPES and rows.stride(-1) == 1
    smooth_ok = smooth is None or (smooth.dtype == torch.float32 and smooth.is_contiguous() and smooth.shape == (n,))
    if backend == "torch" or not (usable and smooth_ok) or gate_up.shape[-1] % 2:
        return silu_mul_int8_reference(gate_up, smooth)
    quantized, scale = triton_silu_mul_quantized(rows, torch.int8, smooth)
    return quantized.view(*gate_up.shape[:-1], n), scale.view(*gate_up.shape[:-1], 1)


def _silu_mul_int8_fake(gate_up: torch.Tensor, smooth, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out_shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return gate_up.new_empty(out_shape, dtype=torch.int8), gate_up.new_empty(
        *gate_up.shape[:-1], 1, dtype=torch.float32
    )


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("silu_mul_int8", _silu_mul_int8, _device)
torch.library.register_fake("compiled_llm::silu_mul_int8", _silu_mul_int8_fake, lib=_LIBRARY)
