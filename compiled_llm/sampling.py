"""Next-token choice over a batch of rows, each with its own parameters, on the logits' device.

The logits processors run in Hugging Face's order (temperature, top-k, top-p, min-p) so that
`CompiledModel.generate` gives HF's tokens; the serving engine adds its penalties before. Sampling draws
one exponential variate per vocabulary entry and takes argmax(p / q) (the "exponential race", the same
distribution as multinomial sampling): rows with their own generator draw from it alone, so a seeded row
gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compiled_llm.runtime.transfer import to_device
from custom_ops.argmax import argmax_rows


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor: logits of the tokens in `seen` [B, L] are divided by
    `penalty` where positive, multiplied where negative."""
    scores = torch.gather(logits, 1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


# Temperatures below this are greedy: dividing logits by them overflows float32.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingTensors:
    """One step's per-row parameters. A field is None where no row uses it, which skips its work."""

    temperature: torch.Tensor | None  # [B] float; < GREEDY_BELOW = greedy. None: every row greedy
    top_k: torch.Tensor | None = None  # [B] int64; >= vocab size = off
    top_p: torch.Tensor | None = None  # [B] float; 1 = off
    min_p: torch.Tensor | None = None  # [B] float; 0 = off
    generators: Sequence[torch.Generator | None] = ()  # per row (or empty): its own random stream

    @classmethod
    def build(cls, rows: Sequence, device: torch.device, vocab_size: int,
              generators: Sequence[torch.Generator | None] = ()) -> SamplingTensors:  # fmt: skip
        """From per-row objects with `temperature`, `top_k` (None = off), `top_p` and `min_p` attributes."""
        if all(r.temperature < GREEDY_BELOW for r in rows):
            return cls(None)

        def column(values, dtype, neutral):
            return None if all(v == neutral for v in values) else to_device(values, dtype, device)

        return cls(
            temperature=column([r.temperature for r in rows], torch.float32, None),
            top_k=column([r.top_k or vocab_size for r in rows], torch.int64, vocab_size),
            top_p=column([r.top_p for r in rows], torch.float32, 1.0),
            min_p=column([r.min_p for r in rows], torch.float32, 0.0),
            generators=generators if any(g is not None for g in generators) else (),
        )


def _exponential_noise(like: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(like).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # a 0 would pick its token even at probability 0


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """[B, V] logits -> [B] int64 tokens: argmax for greedy rows, a draw from the processed
    distribution for the others."""
    if params.temperature is None:
        return argmax_rows(logits)
    greedy = params.temperature < GREEDY_BELOW
    scores = logits.float() / torch.where(greedy, 1.0, params.temperature)[:, None]
    if params.top_k is not None or params.top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        drop = torch.zeros_like(sorted_scores, dtype=torch.bool)
        if params.top_k is not None:  # keep scores >= the k-th largest (ties kept, as HF)
            kth = sorted_scores.gather(1, (params.top_k.clamp(max=scores.shape[-1]) - 1)[:, None])
            drop |= sorted_scores < kth
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        if params.top_p is not None:  # drop a token once the mass before it already reaches top_p
            probs = sorted_scores.softmax(dim=-1)
            drop |= probs.cumsum(dim=-1) - probs >= params.top_p[:, None]
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    if params.min_p is not None:
        probs = probs.masked_fill(probs < params.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    sampled = argmax_rows(probs / _exponential_noise(probs, params.generators))
    return torch.where(greedy, argmax_rows(logits), sampled)


@dataclass(frozen=True)
class _Uniform:
    temperature: float
    top_k: int | None
    top_p: float
    min_p: float = 0.0


def next_tokens(
    logits: torch.Tensor,  # [B, V]
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [B] int64
    """The same parameters for every row (`CompiledModel.generate`)."""
    if not do_sample or temperature < GREEDY_BELOW:
        return argmax_rows(logits)
    row = _Uniform(temperature, top_k or None, 1.0 if top_p is None else top_p)
    generators = [generator] * logits.shape[0] if generator is not None else ()
    return sample(logits, SamplingTensors.build([row] * logits.shape[0], logits.device, logits.shape[-1], generators))
