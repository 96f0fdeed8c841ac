"""Next-token choice for `CompiledModel.generate`, with Hugging Face's semantics and order of warpers
(temperature, then top-k, then top-p) so that `do_sample=False` gives HF's greedy tokens."""

from __future__ import annotations

import torch


def next_tokens(
    logits: torch.Tensor,  # [B, V]
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:  # [B] int64
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_scores.softmax(dim=-1) >= top_p  # mass before a token already >= top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(-1)
