"""`compiled_llm::qk_rms_norm`: the per-head RMSNorms of one attention layer's queries and keys (Qwen3's q_norm and
k_norm), in one call.

    qk_rms_norm(q, k, w_q, w_k, eps) = (rms_norm(q, w_q, eps), rms_norm(k, w_k, eps))
    q [..., Hq, D], k [..., Hkv, D] (the same leading dims), w_q and w_k [D]; both outputs contiguous

Numerics are `rms_norm`'s (op.py's reference, HF's RMSNorm) row by row. The `triton` backend is one launch with a
program per (token, head) row of q and then of k, which picks its input, weight and output by its row index, where
two `rms_norm` calls are two launches of a few microseconds each at batch-1 decode. It reads q and k through their
token and head strides (views of a fused qkv output, which `rms_norm` would first copy). `torch` is the reference.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.rms_norm.op import _out_dtype, _triton_usable, _warps, reference_rms_norm
from custom_ops.triton_runtime import pdl_launch_options

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "qk_rms_norm(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, str backend) -> (Tensor, Tensor)"
)


def reference_qk_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float):
    return reference_rms_norm(q, q_weight, eps), reference_rms_norm(k, k_weight, eps)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qk_rms_norm_kernel(
        q_ptr, k_ptr, qw_ptr, kw_ptr, q_out_ptr, k_out_ptr, q_rows, stride_qt, stride_qh, stride_kt, stride_kh, eps,
        HQ: tl.constexpr, HK: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)  # q's rows (token-major), then k's
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        if row < q_rows:
            x_ptr = q_ptr + (row // HQ) * stride_qt + (row % HQ) * stride_qh
            w_ptr = qw_ptr
            out_ptr = q_out_ptr + row * N
        else:
            krow = row - q_rows
            x_ptr = k_ptr + (krow // HK) * stride_kt + (krow % HK) * stride_kh
            w_ptr = kw_ptr
            out_ptr = k_out_ptr + krow * N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a parameter: before the wait
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        h = tl.load(x_ptr + cols, mask=mask, other=0.0)
        x_dtype = h.dtype
        h = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        normed = (h * rstd).to(x_dtype).to(tl.float32)  # rounded to x's dtype before the weight, as HF's norm
        tl.store(out_ptr + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    return qk_rms_norm_kernel


def _heads(x: torch.Tensor) -> torch.Tensor:
    """x as [tokens, H, D] with unit last stride (a view of a fused qkv output stays one)."""
    x3 = x.reshape(-1, *x.shape[-2:])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> None:
    if q.dim() < 2 or k.dim() < 2 or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"qk_rms_norm: q {tuple(q.shape)} and k {tuple(k.shape)} must be [..., heads, head_dim] with the same "
            "leading dims and head_dim"
        )
    if q.dtype != k.dtype or q_weight.dtype != k_weight.dtype:
        raise ValueError(
            f"qk_rms_norm: q and k of one dtype ({q.dtype}, {k.dtype}), and their weights too "
            f"({q_weight.dtype}, {k_weight.dtype})"
        )
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        if weight.shape != (q.shape[-1],):
            raise ValueError(f"qk_rms_norm: {name} of shape {tuple(weight.shape)} for heads of {q.shape[-1]}")


def _qk_rms_norm(q, k, q_weight, k_weight, eps: float, backend: str):
    _check(q, k, q_weight, k_weight)
    if backend == "torch" or not (_triton_usable(q) and q_weight.is_contiguous() and k_weight.is_contiguous()):
        q_out, k_out = reference_qk_rms_norm(q, k, q_weight, k_weight, eps)
        return q_out.contiguous(), k_out.contiguous()  # the layout the fake promises
    import triton

    q3, k3 = _heads(q), _heads(k)
    dtype = _out_dtype(q, q_weight)
    q_out = torch.empty(q3.shape, dtype=dtype, device=q.device)
    k_out = torch.empty(k3.shape, dtype=dtype, device=q.device)
    (tokens, hq, n), hk = q3.shape, k3.shape[1]
    if tokens:
        block = triton.next_power_of_2(n)
        _kernel()[(tokens * (hq + hk),)](
            q3, k3, q_weight, k_weight, q_out, k_out, tokens * hq, q3.stride(0), q3.stride(1), k3.stride(0),
            k3.stride(1), eps, HQ=hq, HK=hk, N=n, BLOCK=block, num_warps=_warps(block), **pdl_launch_options(q3),
        )  # fmt: skip
    return q_out.view(q.shape), k_out.view(k.shape)


def _qk_rms_norm_fake(q, k, q_weight, k_weight, eps, backend):
    dtype = _out_dtype(q, q_weight)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("qk_rms_norm", _qk_rms_norm, _device)
torch.library.register_fake("compiled_llm::qk_rms_norm", _qk_rms_norm_fake, lib=_LIBRARY)
