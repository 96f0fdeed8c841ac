"""`compiled_llm::qk_rms_norm`: the per-head RMSNorms of one attention layer's queries and keys (Qwen3's q_norm and
k_norm), in one call, and optionally the rotary embedding after them.

    qk_rms_norm(q, k, w_q, w_k, eps) = (rms_norm(q, w_q, eps), rms_norm(k, w_k, eps))
    qk_rms_norm(q, k, w_q, w_k, eps, cos=cos, sin=sin) = (rope(rms_norm(q, w_q, eps)), rope(rms_norm(k, w_k, eps)))
    q [..., T, Hq, D], k [..., T, Hkv, D] (the same leading dims), w_q and w_k [D], cos and sin [T, D]; both outputs
    contiguous; rope(y) = y * cos + rotate_half(y) * sin (HF's), in float32 from the norm's rounded output, rounded once
    (as Inductor computes HF's RoPE)

Numerics are `rms_norm`'s (op.py's reference, HF's RMSNorm) row by row. The `triton` backend is one launch with a
program per (token, head) row of q and then of k, which picks its input, weight and output by its row index, where
two `rms_norm` calls are two launches of a few microseconds each at batch-1 decode, and RoPE a third. It reads q and k
through their token and head strides (views of a fused qkv output, which `rms_norm` would first copy). `torch` is the
reference.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.rms_norm.op import _out_dtype, _rows, _triton_usable, _warps, reference_rms_norm
from custom_ops.triton_runtime import pdl_launch_options

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "qk_rms_norm(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, str backend, Tensor? cos=None, "
    "Tensor? sin=None) -> (Tensor, Tensor)"
)


def reference_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's y * cos + rotate_half(y) * sin over y [..., H, D] and cos, sin [tokens, D] (a row for each of y's
    leading positions, flattened), in float32, rounded once."""
    half = y.shape[-1] // 2
    y32 = y.reshape(-1, *y.shape[-2:]).float()
    rotated = torch.cat([-y32[..., half:], y32[..., :half]], dim=-1)
    out = y32 * cos.float().unsqueeze(-2) + rotated * sin.float().unsqueeze(-2)
    return out.to(y.dtype).view(y.shape)


def reference_qk_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                          cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):  # fmt: skip
    q_out, k_out = reference_rms_norm(q, q_weight, eps), reference_rms_norm(k, k_weight, eps)
    if cos is None:
        return q_out, k_out
    return reference_rope(q_out, cos, sin), reference_rope(k_out, cos, sin)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qk_rms_norm_kernel(
        q_ptr, k_ptr, qw_ptr, kw_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, q_rows, stride_qt, stride_qh, stride_kt,
        stride_kh, stride_cos, stride_sin, eps,
        HQ: tl.constexpr, HK: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)  # q's rows (token-major), then k's
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        if row < q_rows:
            token = row // HQ
            x_ptr = q_ptr + token * stride_qt + (row % HQ) * stride_qh
            w_ptr = qw_ptr
            out_ptr = q_out_ptr + row * N
        else:
            krow = row - q_rows
            token = krow // HK
            x_ptr = k_ptr + token * stride_kt + (krow % HK) * stride_kh
            w_ptr = kw_ptr
            out_ptr = k_out_ptr + krow * N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a parameter: before the wait
        # RoPE pairs column c with c + N/2 (rotate_half): the partner's value, normalized by the same row sum
        partner = tl.where(cols < N // 2, cols + N // 2, cols - N // 2)
        if ROPE:
            w_partner = tl.load(w_ptr + partner, mask=mask, other=0.0).to(tl.float32)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        h = tl.load(x_ptr + cols, mask=mask, other=0.0)
        x_dtype = h.dtype
        h = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        normed = (h * rstd).to(x_dtype).to(tl.float32)  # rounded to x's dtype before the weight, as HF's norm
        y = w * normed
        if ROPE:  # on the norm's output as it would be stored, in float32, rounded once
            h_partner = tl.load(x_ptr + partner, mask=mask, other=0.0).to(tl.float32)
            y_partner = w_partner * (h_partner * rstd).to(x_dtype).to(tl.float32)
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
            y_partner = y_partner.to(out_ptr.dtype.element_ty).to(tl.float32)
            rotated = tl.where(cols < N // 2, -y_partner, y_partner)
            cos = tl.load(cos_ptr + token * stride_cos + cols, mask=mask, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + token * stride_sin + cols, mask=mask, other=0.0).to(tl.float32)
            y = y * cos + rotated * sin
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    return qk_rms_norm_kernel


def _heads(x: torch.Tensor) -> torch.Tensor:
    """x as [tokens, H, D] with unit last stride (a view of a fused qkv output stays one)."""
    x3 = x.reshape(-1, *x.shape[-2:])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _check_rope(q: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    if (cos is None) != (sin is None):
        raise ValueError("qk_rms_norm: cos and sin come together (RoPE), or neither")
    if cos is None:
        return
    rows = (q.shape[:-2].numel(), q.shape[-1])  # a row for each token (q's leading positions, flattened)
    if cos.shape != rows or sin.shape != rows or q.shape[-1] % 2:
        raise ValueError(
            f"qk_rms_norm: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [tokens, head_dim] = {rows}, "
            "with an even head_dim"
        )


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


def _qk_rms_norm(q, k, q_weight, k_weight, eps: float, backend: str, cos=None, sin=None):
    _check(q, k, q_weight, k_weight)
    _check_rope(q, cos, sin)
    if backend == "torch" or not (_triton_usable(q) and q_weight.is_contiguous() and k_weight.is_contiguous()):
        q_out, k_out = reference_qk_rms_norm(q, k, q_weight, k_weight, eps, cos, sin)
        return q_out.contiguous(), k_out.contiguous()  # the layout the fake promises
    import triton

    q3, k3 = _heads(q), _heads(k)
    dtype = _out_dtype(q, q_weight)
    q_out = torch.empty(q3.shape, dtype=dtype, device=q.device)
    k_out = torch.empty(k3.shape, dtype=dtype, device=q.device)
    (tokens, hq, n), hk = q3.shape, k3.shape[1]
    rope = cos is not None
    cos, sin = (_rows(cos), _rows(sin)) if rope else (q3, q3)  # unread without RoPE
    if tokens:
        block = triton.next_power_of_2(n)
        _kernel()[(tokens * (hq + hk),)](
            q3, k3, q_weight, k_weight, q_out, k_out, cos, sin, tokens * hq, q3.stride(0), q3.stride(1), k3.stride(0),
            k3.stride(1), cos.stride(0), sin.stride(0), eps, HQ=hq, HK=hk, N=n, BLOCK=block, ROPE=rope,
            num_warps=_warps(block), **pdl_launch_options(q3),
        )  # fmt: skip
    return q_out.view(q.shape), k_out.view(k.shape)


def _qk_rms_norm_fake(q, k, q_weight, k_weight, eps, backend, cos=None, sin=None):
    dtype = _out_dtype(q, q_weight)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("qk_rms_norm", _qk_rms_norm, _device)
torch.library.register_fake("compiled_llm::qk_rms_norm", _qk_rms_norm_fake, lib=_LIBRARY)
