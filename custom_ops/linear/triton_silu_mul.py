"""silu(gate) * up of a gated MLP's [gate | up] rows, in one Triton kernel: what `linear_silu_mul` runs
after cuBLAS for the calls its GEMV does not take (more than one token). Inductor fused the same
pointwise work into one kernel before the op hid it; eager torch would take two.

`triton_silu_mul_quantized`: the same activation written as an FP8 or int8 linear's input (`compiled_llm::silu_mul_fp8`,
`silu_mul_int8`), with a scale per row, one program per row (the row's amax sets its scale)."""

from __future__ import annotations

import functools

import torch

from custom_ops import triton_runtime  # FUSED_PRODUCERS_TRIGGER_LATE, read at each launch
from custom_ops.triton_runtime import pdl_launch_options

BLOCK = 1024


@functools.cache
def _kernels():
    from custom_ops.linear import triton_silu_mul_kernels

    return triton_silu_mul_kernels.silu_mul_kernel, triton_silu_mul_kernels.silu_mul_quantized_kernel


def triton_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (unit last stride) -> silu(gate_up[:, :I]) * gate_up[:, I:], [T, I]."""
    import triton

    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, n)
    if rows and n:
        _kernels()[0][(rows, triton.cdiv(n, BLOCK))](
            gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=BLOCK, **pdl_launch_options(gate_up)
        )  # fmt: skip
    return out


def triton_silu_mul_quantized(gate_up: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                              smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """gate_up [T, 2I] (unit last stride) -> (e4m3 or int8 [T, I], float32 row scales [T, 1]) of silu(gate) * up,
    times a contiguous float32 `smooth` [I] first where given (int8)."""
    import triton

    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    quantized = torch.empty(rows, n, device=gate_up.device, dtype=dtype)
    scale = torch.empty(rows, 1, device=gate_up.device, dtype=torch.float32)
    if rows and n:
        block = triton.next_power_of_2(n)
        _kernels()[1][(rows,)](
            gate_up, smooth if smooth is not None else scale, quantized, scale, n, gate_up.stride(0),
            quantized.stride(0), BLOCK=block, INT8=dtype == torch.int8, HAS_SMOOTH=smooth is not None,
            num_warps=min(16, max(4, block // 1024)), LATE_TRIGGER=triton_runtime.FUSED_PRODUCERS_TRIGGER_LATE,
            **pdl_launch_options(gate_up),
        )  # fmt: skip
    return quantized, scale
