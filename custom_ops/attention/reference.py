"""Dense causal attention over a batch of sequences: the math every attention op is checked against.

Plain torch, any device, computed in at least float32. Semantics follow Hugging Face's eager attention:
scores are scaled, then soft-capped, then masked (causal, optional sliding window), then softmaxed
together with an optional per-head sink logit that takes probability mass but has no value.
"""

from __future__ import annotations

import torch


def attend(
    q: torch.Tensor,  # [B, n, Hq, D]: the last n tokens of each sequence
    k: torch.Tensor,  # [B, L, Hkv, D]: keys of each sequence, valid up to its length
    v: torch.Tensor,  # [B, L, Hkv, Dv]
    lengths: torch.Tensor,  # [B] tokens in each sequence (<= L), the n queries included
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,  # [Hq] logits
) -> torch.Tensor:  # [B, n, Hq, Dv], dtype of q
    batch, n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads  # query head h reads kv head h // group
    out_dtype, compute_dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q = q.to(compute_dtype).view(batch, n, num_kv_heads, group, head_dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k.to(compute_dtype)) * scale  # [B, Hkv, G, n, L]
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap

    q_pos = lengths[:, None, None] - n + torch.arange(n, device=q.device)[None, :, None]  # [B, n, 1]
    k_pos = torch.arange(k.shape[1], device=q.device)[None, None, :]  # [1, 1, L]
    allowed = k_pos <= q_pos
    if sliding_window > 0:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    # Rows past a sequence's length hold whatever the cache held (NaN, say): 0 * NaN would poison the sum.
    v = v.masked_fill(k_pos[0, 0][None, :, None, None] >= lengths[:, None, None, None], 0)

    if sinks is not None:
        sink = sinks.to(compute_dtype).view(1, num_kv_heads, group, 1, 1).expand(batch, -1, -1, n, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(compute_dtype))
    return out.reshape(batch, n, num_q_heads, -1).to(out_dtype)


def attend_one_sequence(
    q: torch.Tensor,  # [n, Hq, D]: the sequence's last n tokens
    k: torch.Tensor,  # [L, Hkv, D]: keys of all L tokens of the sequence
    v: torch.Tensor,  # [L, Hkv, Dv]
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # [n, Hq, Dv]
    lengths = torch.tensor([k.shape[0]], device=q.device)
    return attend(q[None], k[None], v[None], lengths, scale, sliding_window, softcap, sinks)[0]
