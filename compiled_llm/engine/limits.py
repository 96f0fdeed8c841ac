"""What a request may ask of an engine, as plain numbers: checked in the engine's process, and in a server's
API process, which holds no model (engine_core/), before anything is queued."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from compiled_llm.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_seq_len: int
    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks in the cache
    has_tokenizer: bool

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that could never run."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size}), got {bad[:5]}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens + max_tokens={params.max_tokens} exceeds the model's "
                f"context of max_seq_len={self.max_seq_len} tokens"
            )
        if -(-total // self.block_size) > self.num_blocks:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens + max_tokens={params.max_tokens} needs more KV blocks than "
                f"the cache has ({self.num_blocks} of {self.block_size} tokens): raise num_kv_blocks"
            )
        if params.stop and not self.has_tokenizer:
            raise ValueError("stop strings need a tokenizer (LLM(model, tokenizer)); stop_token_ids do not")


class EngineStats(NamedTuple):
    """An engine's queue and KV-cache state at one moment (what a server's /metrics shows)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache
    prefix_queried_tokens: int = 0  # prompt tokens looked up in it
    preemptions: int = 0
