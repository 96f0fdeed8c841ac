"""`sdpa` paged-attention backend: the reference's page gathering, with PyTorch's fused
`scaled_dot_product_attention` in place of attention written out in einsums. The fast backend on CPU;
layers with a soft-cap or sinks (which SDPA lacks) or an fp8 cache fall back to `reference`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from custom_ops.attention_backends import AttentionBackend, LayerAttentionFeatures, register_attention_backend
from custom_ops.paged_attention import paged_attention_over


def _unsupported(features: LayerAttentionFeatures) -> str | None:
    if features.softcap > 0:
        return "soft-cap"
    if features.has_sinks:
        return "attention sinks"
    if features.cache_dtype.itemsize == 1:
        return "fp8 KV cache"
    return None


def sdpa_attend(q, k, v, lengths, scale, sliding_window=0, softcap=0.0, sinks=None) -> torch.Tensor:
    """attend()'s contract (q [B, n, Hq, D] the last n tokens, k/v [B, L, Hkv, D] valid up to `lengths`)."""
    n, length = q.shape[1], k.shape[1]
    q_pos = lengths[:, None] - n + torch.arange(n, device=q.device)  # [B, n]
    k_pos = torch.arange(length, device=q.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, n, L]
    if sliding_window > 0:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    # Past a sequence's length the cache holds anything (NaN, say), which a masked score would still spread.
    stale = (k_pos[None, :] >= lengths[:, None])[:, :, None, None]
    k, v = k.masked_fill(stale, 0), v.masked_fill(stale, 0)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
                                         attn_mask=allowed[:, None], scale=scale, enable_gqa=True)  # fmt: skip
    return out.transpose(1, 2)


register_attention_backend(
    AttentionBackend("sdpa", paged_attention_over(sdpa_attend), devices=("cpu", "cuda"), unsupported=_unsupported)
)
