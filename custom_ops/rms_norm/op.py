"""`compiled_llm::rms_norm` and `compiled_llm::add_rms_norm`: RMSNorm, optionally after the residual add.

    rms_norm(x, w)          = w * (x / sqrt(mean(x^2, -1) + eps)).to(x.dtype)       (HF's LlamaRMSNorm)
    add_rms_norm(x, r, w)   = (rms_norm(h, w), h) with h = x + r in x's dtype

The `triton` backend computes either in one kernel, one program per row. Inductor generates a reduction,
a pointwise kernel and, for the residual stream, a third kernel per norm of a decoder layer (it does
not fuse them under the unbacked token count); at batch-1 decode of a small model each launch costs
about as much as the work. `torch` is the reference. Registered like `compiled_llm::linear`, without
custom_op's wrapper.
"""

from __future__ import annotations

import functools

import torch

from custom_ops import triton_runtime  # FUSED_PRODUCERS_TRIGGER_LATE, read at each launch
from custom_ops.triton_runtime import KERNEL_DTYPES, pdl_launch_options, triton_runs_on

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define("rms_norm(Tensor x, Tensor weight, float eps, str backend) -> Tensor")
_LIBRARY.define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, str backend) -> (Tensor, Tensor)")


def reference_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed


@functools.cache
def _kernel():
    from custom_ops.rms_norm.triton_kernel import rms_norm_kernel

    return rms_norm_kernel


def _triton_usable(x: torch.Tensor) -> bool:
    return triton_runs_on(x) and x.dtype in KERNEL_DTYPES


def _warps(block: int) -> int:
    # One warp up to 1024 columns: its shuffles reduce the row without a shared-memory round trip, which
    # at batch-1 decode of a narrow model (SmolLM2: 576) costs more than the loads.
    return min(16, max(1, block // 1024))


def _launch(x2d: torch.Tensor, residual2d: torch.Tensor | None, weight: torch.Tensor, eps: float, out, total,
            scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None) -> None:  # fmt: skip
    """`scale` given: `out` is e4m3 or int8 and the kernel writes each row's scale there (`add_rms_norm_fp8`,
    `add_rms_norm_int8`, which multiplies the output by a contiguous float32 `smooth` first, where given)."""
    import triton

    n = x2d.shape[-1]
    block = triton.next_power_of_2(n)
    if x2d.shape[0]:
        _kernel()[(x2d.shape[0],)](
            x2d, residual2d if residual2d is not None else x2d, weight, out, total if total is not None else out,
            scale if scale is not None else out, smooth if smooth is not None else weight, x2d.stride(0),
            residual2d.stride(0) if residual2d is not None else 0, out.stride(0),
            total.stride(0) if total is not None else 0, eps, N=n, BLOCK=block, ADD=residual2d is not None,
            QUANTIZED_OUT=scale is not None, INT8=out.dtype == torch.int8, HAS_SMOOTH=smooth is not None,
            num_warps=_warps(block),
            LATE_TRIGGER=scale is not None and triton_runtime.FUSED_PRODUCERS_TRIGGER_LATE,
            **pdl_launch_options(x2d),
        )  # fmt: skip


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, N] with unit last stride (a copy only where the layout needs one)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    _check(x, weight)
    if backend == "torch" or not _triton_usable(x) or not weight.is_contiguous():
        return reference_rms_norm(x, weight, eps).contiguous()  # the layout the fake promises
    x2d = _rows(x)
    out = torch.empty(x2d.shape, dtype=_out_dtype(x, weight), device=x.device)
    _launch(x2d, None, weight, eps, out, None)
    return out.view(x.shape)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, backend: str):
    _check(x, weight, residual)
    if backend == "torch" or not _triton_usable(x) or not weight.is_contiguous():
        total = (x + residual).contiguous()
        return reference_rms_norm(total, weight, eps).contiguous(), total
    x2d, r2d = _rows(x), _rows(residual)
    out = torch.empty(x2d.shape, dtype=_out_dtype(x, weight), device=x.device)
    total = torch.empty_like(x2d)
    _launch(x2d, r2d, weight, eps, out, total)
    return out.view(x.shape), total.view(x.shape)


def _rms_norm_fake(x, weight, eps, backend):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


def _add_rms_norm_fake(x, residual, weight, eps, backend):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight)), x.new_empty(x.shape)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("rms_norm", _rms_norm, _device)
    _LIBRARY.impl("add_rms_norm", _add_rms_norm, _device)
torch.library.register_fake("compiled_llm::rms_norm", _rms_norm_fake, lib=_LIBRARY)
torch.library.register_fake("compiled_llm::add_rms_norm", _add_rms_norm_fake, lib=_LIBRARY)
