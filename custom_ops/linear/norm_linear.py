"""`compiled_llm::add_rms_norm_linear`: a decoder layer's residual add and RMSNorm together with the linear that reads
the norm, so that a one-row call (a batch-1 decode step) runs them as one kernel, the GEMV with the norm in its
prologue (triton_gemv_kernels.py, NORM).

    y, normed, total = add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul, backend)
        normed, total = add_rms_norm(x, residual, norm_weight, eps)
        y = linear(normed, weight, bias)           (silu_mul: linear_silu_mul's silu(gate) * up)

`normed` and `total` are the norm's own outputs, for its other readers (the residual stream, a router's experts). The
`torch` backend is those two ops' references; `triton` runs the fused GEMV where the one-row GEMV would run the linear
(op._gemv_tile: the untuned choice or the autotuner's), and otherwise the two ops' `triton` paths one after the other,
so more rows, other dtypes and shapes tuned to cuBLAS compute what they computed before the fusion.
"""

from __future__ import annotations

import torch

from custom_ops.linear.op import LINEAR_BACKENDS, LINEAR_SILU_MUL_BACKENDS, _gemv_tile
from custom_ops.linear.triton_gemv import gemv_config, launch_gemv
from custom_ops.rms_norm.op import _add_rms_norm

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "add_rms_norm_linear(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight, Tensor? bias, "
    "bool silu_mul, str backend) -> (Tensor, Tensor, Tensor)"
)


def unfused(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
            bias: torch.Tensor | None, silu_mul: bool, backend: str) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The two ops the fused one stands for, each in `backend` ("torch": the reference)."""
    normed, total = _add_rms_norm(x, residual, norm_weight, eps, backend)
    y = (LINEAR_SILU_MUL_BACKENDS if silu_mul else LINEAR_BACKENDS)[backend](normed, weight, bias)
    return y, normed, total


def reference_add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul):
    return unfused(x, residual, norm_weight, eps, weight, bias, silu_mul, "torch")


# Weight rows a program of the fused GEMV takes at least: each program recomputes the norm (1.4x the GEMV's sm_90a
# instructions at K = 4,096 and one row a program), so more rows a program share that cost. 1: the GEMV's own
# tile; a larger value keeps its weights a load (BLOCK_N x BLOCK_K) by narrowing BLOCK_K. Not yet timed on a GPU.
MIN_ROWS_A_PROGRAM = 1


def _fused_tile(tile: dict, x: torch.Tensor, n: int) -> dict:
    """The GEMV's tile for the fused call: `tile` (tuned overrides) over gemv_config's, widened to MIN_ROWS_A_PROGRAM
    rows where untuned."""
    if tile or MIN_ROWS_A_PROGRAM <= 1:
        return tile
    config = gemv_config(1, x.shape[-1], n)
    if config["BLOCK_N"] >= MIN_ROWS_A_PROGRAM:
        return tile
    block_k = max(16, config["BLOCK_K"] * config["BLOCK_N"] // MIN_ROWS_A_PROGRAM)
    return {"BLOCK_N": MIN_ROWS_A_PROGRAM, "BLOCK_K": block_k, "PREFETCH_K": block_k}


def _fused_takes(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, silu_mul: bool) -> dict | None:  # fmt: skip
    """The GEMV's tile where one kernel computes the call (one row the GEMV takes, the norm's operands in x's dtype
    and layout), else None."""
    if silu_mul and weight.shape[0] % 2:
        return None
    tile = _gemv_tile(x, weight, bias, silu_mul)
    takes = (
        tile is not None and residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
        and norm_weight.shape == (x.shape[-1],) and norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
    )  # fmt: skip
    return tile if takes else None


def _add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_mul, backend):
    tile = _fused_takes(x, residual, norm_weight, weight, bias, silu_mul) if backend == "triton" else None
    if tile is None:
        return unfused(x, residual, norm_weight, eps, weight, bias, silu_mul, backend)
    k = x.shape[-1]
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty_like(total)
    r2d = residual.reshape(1, k)
    norm = (r2d, norm_weight, total, normed, r2d.stride(0), eps)
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    y = launch_gemv(x.reshape(1, k), weight, None, bias, silu_mul, norm=norm, **_fused_tile(tile, x, n))
    return y.view(*x.shape[:-1], y.shape[-1]), normed, total


def _add_rms_norm_linear_fake(x, residual, norm_weight, eps, weight, bias, silu_mul, backend):
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    normed = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, norm_weight.dtype))
    return normed.new_empty(*x.shape[:-1], n), normed, x.new_empty(x.shape)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("add_rms_norm_linear", _add_rms_norm_linear, _device)
torch.library.register_fake("compiled_llm::add_rms_norm_linear", _add_rms_norm_linear_fake, lib=_LIBRARY)
