"""Executes one engine step: flat tokens of many sequences + attention metadata -> logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq

import torch

from compiled_llm.runtime.kv_cache import PagedKVCache
from compiled_llm.runtime.sequence import ScheduledChunk, Sequence

# Inputs whose first dimension changes from step to step (tokens, logits, or sequences of the step).
STEP_INPUTS = (
    "input_ids", "position_ids", "logits_indices", "slot_mapping", "block_table", "query_start_loc", "seq_lens",
)  # fmt: skip


class ModelRunner:
    """Runs the compiled graph over a `PagedKVCache`; owns block allocation for the sequences it runs."""

    def __init__(
        self,
        graph: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        kv_cache: PagedKVCache,
        max_seq_len: int,
        device: torch.device,
    ):
        self.graph = graph
        self.kv_cache = kv_cache
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = kv_cache.blocks_for(max_seq_len)
        self.device = device

    def ensure_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks to hold its first `num_tokens` tokens."""
        missing = self.kv_cache.blocks_for(num_tokens) - len(seq.block_ids)
        if missing > 0:
            seq.block_ids += self.kv_cache.allocator.allocate(missing)

    def release(self, seq: Sequence) -> None:
        self.kv_cache.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = 0

    def step_inputs(self, chunks: Seq[ScheduledChunk]) -> dict[str, torch.Tensor]:
        """Host-side flat token batch and attention metadata of one step (allocates blocks as needed)."""
        block_size = self.kv_cache.block_size
        input_ids, positions, slots, logits_indices = [], [], [], []
        query_start_loc, seq_lens, block_rows = [0], [], []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            end = start + chunk.num_tokens
            if chunk.num_tokens < 1 or end > len(seq):
                raise ValueError(f"cannot compute tokens {start}:{end} of a sequence of {len(seq)} tokens")
            if end > self.max_seq_len:
                raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len}")
            self.ensure_blocks(seq, end)
            first = len(input_ids)
            input_ids += seq.token_ids[start:end]
            positions += range(seq.first_position + start, seq.first_position + end)
            slots += (seq.block_ids[p // block_size] * block_size + p % block_size for p in range(start, end))
            if chunk.logits == "all":
                logits_indices += range(first, len(input_ids))
            elif chunk.logits == "last":
                logits_indices.append(len(input_ids) - 1)
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            block_rows.append(seq.block_ids + [0] * (self.max_blocks_per_seq - len(seq.block_ids)))

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return {
            "input_ids": tensor(input_ids, torch.int64),
            "position_ids": tensor(positions, torch.int64),
            "logits_indices": tensor(logits_indices, torch.int64),
            "slot_mapping": tensor(slots, torch.int64),
            "block_table": tensor(block_rows, torch.int32),
            "query_start_loc": tensor(query_start_loc, torch.int32),
            "seq_lens": tensor(seq_lens, torch.int32),
        }

    def execute(self, chunks: Seq[ScheduledChunk]) -> torch.Tensor:
        """Run one step; returns logits [N, vocab] of the tokens that asked for them, in chunk order."""
        inputs = self.step_inputs(chunks)
        wanted = inputs["logits_indices"].numel()
        if wanted == 0:  # e.g. a middle prefill chunk: keep the graph's logits dimension non-empty
            inputs["logits_indices"] = torch.tensor([inputs["input_ids"].numel() - 1], device=self.device)
        logits = self.graph({**inputs, **self.kv_cache.tensors})
        for chunk in chunks:
            chunk.seq.num_computed += chunk.num_tokens
        return logits[:wanted]
