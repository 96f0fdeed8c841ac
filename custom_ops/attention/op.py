"""`compiled_llm::attention`: the canonical attention op that capture routes every layer through.

It carries the full semantics of a decoder attention call, so passes can swap it for an optimized op
without looking at the model's code: q/k/v of one causal sequence of T tokens (NHD layout), the layer
index, scale, sliding window, logit soft-cap and attention sinks.
"""

from __future__ import annotations

import torch

from custom_ops.attention.reference import attend_one_sequence


@torch.library.custom_op("compiled_llm::attention", mutates_args=())
def attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, Dv]
    layer_idx: int,
    scale: float,
    sliding_window: int,  # keys within the last `sliding_window` positions (query included); 0 = all
    softcap: float,  # scores -> tanh(scores / softcap) * softcap; 0 = off
    sinks: torch.Tensor | None,  # [Hq] sink logits, or None
) -> torch.Tensor:  # [T, Hq, Dv]
    """Causal self-attention over one sequence (reference implementation, any device)."""
    return attend_one_sequence(q, k, v, scale, sliding_window, softcap, sinks).contiguous()


@attention.register_fake
def _(q, k, v, layer_idx, scale, sliding_window, softcap, sinks):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])
