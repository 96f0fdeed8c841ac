"""silu(gate) * up of a gated MLP's [gate | up] rows, in one Triton kernel: what `linear_silu_mul` runs
after cuBLAS for the calls its GEMV does not take (more than one token). Inductor fused the same
pointwise work into one kernel before the op hid it; eager torch would take two.

`triton_silu_mul_fp8`: the same activation written as an FP8 linear's input (`compiled_llm::silu_mul_fp8`), e4m3
with a scale per row, one program per row (the row's amax sets its scale)."""

from __future__ import annotations

import functools

import torch

from custom_ops import triton_runtime  # FUSED_PRODUCERS_TRIGGER_LATE, read at each launch
from custom_ops.triton_runtime import pdl_launch_options

BLOCK = 1024


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def silu_mul_kernel(x_ptr, y_ptr, N, stride_x, stride_y, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
        dtype = y_ptr.dtype.element_ty
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)  # rounded where F.silu rounds
        tl.store(y_ptr + row * stride_y + cols, (act * up).to(dtype), mask=mask)

    @triton.jit
    def silu_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, N, stride_x, stride_q, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
                            LATE_TRIGGER: tl.constexpr = False):  # fmt: skip
        if USE_PDL and not LATE_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        h = (act * up).to(dtype).to(tl.float32)  # the activation silu_mul_kernel writes, then fp8.scale_and_round
        scale = tl.maximum(tl.max(tl.abs(h), axis=0), 1e-12) * (1.0 / 448.0)
        q = tl.clamp(h * tl.math.div_rn(1.0, scale), -448.0, 448.0).to(tl.float8e4nv)
        tl.store(q_ptr + row * stride_q + cols, q, mask=mask)
        tl.store(s_ptr + row, scale)
        if USE_PDL and LATE_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()

    return silu_mul_kernel, silu_mul_fp8_kernel


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


def triton_silu_mul_fp8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T, 2I] (unit last stride) -> (e4m3 [T, I], float32 row scales [T, 1]) of silu(gate) * up."""
    import triton

    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    quantized = torch.empty(rows, n, device=gate_up.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=gate_up.device, dtype=torch.float32)
    if rows and n:
        block = triton.next_power_of_2(n)
        _kernels()[1][(rows,)](
            gate_up, quantized, scale, n, gate_up.stride(0), quantized.stride(0), BLOCK=block,
            num_warps=min(16, max(4, block // 1024)), LATE_TRIGGER=triton_runtime.FUSED_PRODUCERS_TRIGGER_LATE, **pdl_launch_options(gate_up),
        )  # fmt: skip
    return quantized, scale
