"""silu(gate) * up of a gated MLP's [gate | up] rows, in one Triton kernel: what `linear_silu_mul` runs
after cuBLAS for the calls its GEMV does not take (more than one token). Inductor fused the same
pointwise work into one kernel before the op hid it; eager torch would take two."""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import pdl_launch_options

BLOCK = 1024


@functools.cache
def _kernel():
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

    return silu_mul_kernel


def triton_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (unit last stride) -> silu(gate_up[:, :I]) * gate_up[:, I:], [T, I]."""
    import triton

    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, n)
    if rows and n:
        _kernel()[(rows, triton.cdiv(n, BLOCK))](
            gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=BLOCK, **pdl_launch_options(gate_up)
        )  # fmt: skip
    return out
