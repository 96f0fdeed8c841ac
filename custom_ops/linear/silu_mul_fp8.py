"""`compiled_llm::silu_mul_fp8`: a gated MLP's activation written as its down projection's FP8 input:
(x8, s_x) = quantize_rows(silu(gate) * up) for gate_up = [gate | up], the activation rounded to gate_up's dtype
first, exactly as the activation then `fp8_linear`'s per-token quantization compute it (fp8.scale_and_round).

The `triton` backend is one kernel (triton_silu_mul.py) where Inductor's activation kernel and the down
projection's quantizing kernel were two, and it writes 1 byte a value; `torch` is the reference.
"""

from __future__ import annotations

import torch

from custom_ops.linear.fp8 import FP8, quantize_rows
from custom_ops.linear.op import silu_and_mul
from custom_ops.linear.triton_silu_mul import triton_silu_mul_quantized
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_runs_on

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define("silu_mul_fp8(Tensor gate_up, str backend) -> (Tensor, Tensor)")


def silu_mul_fp8_reference(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    activation = silu_and_mul(gate_up)
    quantized, scale = quantize_rows(activation.reshape(-1, activation.shape[-1]))
    return quantized.view(activation.shape), scale.view(*activation.shape[:-1], 1)


def _silu_mul_fp8(gate_up: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    usable = triton_runs_on(gate_up) and gate_up.dtype in KERNEL_DTYPES and rows.stride(-1) == 1
    if backend == "torch" or not usable or gate_up.shape[-1] % 2:
        return silu_mul_fp8_reference(gate_up)
    quantized, scale = triton_silu_mul_quantized(rows)
    out_shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return quantized.view(out_shape), scale.view(*gate_up.shape[:-1], 1)


def _silu_mul_fp8_fake(gate_up: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out_shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return gate_up.new_empty(out_shape, dtype=FP8), gate_up.new_empty(*gate_up.shape[:-1], 1, dtype=torch.float32)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("silu_mul_fp8", _silu_mul_fp8, _device)
torch.library.register_fake("compiled_llm::silu_mul_fp8", _silu_mul_fp8_fake, lib=_LIBRARY)
