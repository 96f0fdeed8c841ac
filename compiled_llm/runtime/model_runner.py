"""Executes one engine step: flat tokens of many sequences + attention metadata -> logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from compiled_llm.capture import GRAPH_INPUTS
from compiled_llm.runtime.kv_cache import SCRATCH_BLOCK, PagedKVCache
from compiled_llm.runtime.sequence import ScheduledChunk, Sequence
from compiled_llm.runtime.transfer import to_device
from custom_ops import AttentionPlanner, StepAttentionMetadata, planned_step
from fx_passes import PAGED_INPUTS

# The inputs the runner builds each step (the KV caches are the other graph inputs), and their dtypes.
STEP_INPUTS = GRAPH_INPUTS + PAGED_INPUTS
STEP_INPUT_DTYPES = {
    "input_ids": torch.int64, "position_ids": torch.int64, "logits_indices": torch.int64,
    "slot_mapping": torch.int64, "block_table": torch.int32, "query_start_loc": torch.int32, "seq_lens": torch.int32,
}  # fmt: skip


@dataclass
class TokenFills:
    """Step input tokens that come from the device: input_ids[dst[i]] = tokens[src[i]]."""

    tokens: torch.Tensor
    dst: list[int]
    src: list[int]

    def apply(self, input_ids: torch.Tensor) -> None:
        n = len(self.dst)
        if self.dst == self.src == list(range(n)):  # a decode step fed in order: one plain copy
            input_ids[:n].copy_(self.tokens[:n], non_blocking=True)
        else:
            src = to_device(self.src, torch.long, input_ids.device)
            input_ids[to_device(self.dst, torch.long, input_ids.device)] = self.tokens[src]


class ModelRunner:
    """Runs the compiled graph over a `PagedKVCache`; owns block allocation for the sequences it runs.

    Each step: build the flat batch and its metadata on the host, let the attention backends plan it
    (outside the graph), copy the inputs to the device, run the graph (or replay its CUDA graph).
    """

    def __init__(
        self,
        graph: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        kv_cache: PagedKVCache,
        planners: dict[str, AttentionPlanner],
        max_seq_len: int,
        device: torch.device,
    ):
        self.graph = graph
        self.kv_cache = kv_cache
        self.planners = planners
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = kv_cache.blocks_for(max_seq_len)
        self.device = device
        self.cuda_graphs = None  # a DecodeCudaGraphs, once captured

    def ensure_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks to hold its first `num_tokens` tokens."""
        missing = self.kv_cache.blocks_for(num_tokens) - len(seq.block_ids)
        if missing > 0:
            seq.block_ids += self.kv_cache.allocator.allocate(missing)

    def release(self, seq: Sequence) -> None:
        seq.release(self.kv_cache.allocator)

    def step_inputs(
        self, chunks: Seq[ScheduledChunk], pad_to_seqs: int = 0
    ) -> tuple[dict[str, torch.Tensor], StepAttentionMetadata, int]:
        """Host tensors of one step, its attention metadata and how many logits were asked for.

        Allocates blocks as needed. `pad_to_seqs` appends one-token padding sequences (scratch block,
        logits computed and ignored) up to that many sequences, for a CUDA graph of that batch size.
        """
        block_size = self.kv_cache.block_size
        width = 1  # block-table columns: the step's longest sequence, not max_seq_len
        for chunk in chunks:
            width = max(width, -(-(chunk.seq.num_computed + chunk.num_tokens) // block_size))
        input_ids, positions, slots, logits_indices = [], [], [], []
        query_start_loc, seq_lens, block_table = [0], [], []  # block_table: row-major, `width` per sequence
        # Runs for every sequence of every step (a thousand at large batches): one-token chunks (decode)
        # take a path of plain appends.
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_tokens
            tokens, blocks, start = seq.token_ids, seq.block_ids, seq.num_computed
            end = start + n
            if n < 1 or end > len(tokens):
                raise ValueError(f"cannot compute tokens {start}:{end} of a sequence of {len(tokens)} tokens")
            if end > self.max_seq_len:
                raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len}")
            if len(blocks) * block_size < end:
                self.ensure_blocks(seq, end)
                blocks = seq.block_ids
            if n == 1:
                input_ids.append(tokens[start])
                positions.append(seq.first_position + start)
                slots.append(blocks[start // block_size] * block_size + start % block_size)
            else:
                input_ids += tokens[start:end]
                positions += range(seq.first_position + start, seq.first_position + end)
                slots += (blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
            total = len(input_ids)
            if chunk.logits == "last":
                logits_indices.append(total - 1)
            elif chunk.logits == "all":
                logits_indices += range(total - n, total)
            query_start_loc.append(total)
            seq_lens.append(end)
            if len(blocks) >= width:
                block_table += blocks[:width]
            else:
                block_table += blocks
                block_table += [SCRATCH_BLOCK] * (width - len(blocks))
        wanted = len(logits_indices)
        padding = pad_to_seqs - len(chunks)
        if padding > 0:
            first = len(input_ids)
            logits_indices += range(first, first + padding)
            input_ids += [0] * padding
            positions += [0] * padding
            slots += [SCRATCH_BLOCK * block_size] * padding
            query_start_loc += range(first + 1, first + padding + 1)
            seq_lens += [1] * padding
            block_table += [SCRATCH_BLOCK] * (width * padding)
        if not logits_indices:  # e.g. a middle prefill chunk: keep the graph's logits dimension non-empty
            logits_indices.append(len(input_ids) - 1)

        # Pinned, so that copies to the GPU are asynchronous: a copy from pageable memory waits for the
        # GPU to finish everything queued before it, which would stall the pipelined decode loop.
        pinned = self.device.type == "cuda"
        values = {
            "input_ids": input_ids, "position_ids": positions, "logits_indices": logits_indices, "slot_mapping": slots,
            "block_table": block_table, "query_start_loc": query_start_loc, "seq_lens": seq_lens,
        }  # fmt: skip
        inputs = {name: torch.tensor(values[name], dtype=STEP_INPUT_DTYPES[name], pin_memory=pinned) for name in STEP_INPUTS}
        inputs["block_table"] = inputs["block_table"].view(len(seq_lens), width)
        metadata = StepAttentionMetadata(
            block_table=inputs["block_table"],
            query_start_loc=inputs["query_start_loc"],
            seq_lens=inputs["seq_lens"],
            block_size=block_size,
            max_blocks_per_seq=self.max_blocks_per_seq,
            is_decode=len(input_ids) == len(seq_lens),  # one token each: every chunk here has one at least
        )
        return inputs, metadata, wanted

    def run_graph(self, inputs: dict[str, torch.Tensor], metadata: StepAttentionMetadata,
                  fills: TokenFills | None = None) -> torch.Tensor:  # fmt: skip
        """Plan the step and run the graph on host `inputs` (copied to the device here)."""
        for planner in self.planners.values():
            planner.plan(metadata)
        device_inputs = {name: t.to(self.device, non_blocking=True) for name, t in inputs.items()}
        if fills is not None:
            fills.apply(device_inputs["input_ids"])
        with planned_step(self.planners):
            return self.graph({**device_inputs, **self.kv_cache.tensors})

    def replays_as_graph(self, chunks: Seq[ScheduledChunk]) -> bool:
        """Whether this step would replay a CUDA graph (which lets the caller prepare the next step
        before reading this one's results; see cuda_graphs.py)."""
        return self.cuda_graphs is not None and self.cuda_graphs.batch_size_for(chunks) is not None

    def execute(self, chunks: Seq[ScheduledChunk], device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns logits [N, vocab] of the tokens that asked for them, in chunk order.

        Returns without waiting for the device. A chunk with a `fill_row` takes its last token from that
        row of `device_tokens` (tokens the previous step sampled, still on the device): a step can start
        before the host has read them. A step that replays a CUDA graph returns logits in the graph's
        output buffer, valid until the next replay of the same batch size.
        """
        fills = self._fills(chunks, device_tokens)
        graph_batch = self.cuda_graphs.batch_size_for(chunks) if self.cuda_graphs is not None else None
        with record_function("compiled_llm.step_inputs"):
            inputs, metadata, wanted = self.step_inputs(chunks, pad_to_seqs=graph_batch or 0)
        if graph_batch is not None:
            logits = self.cuda_graphs.replay(graph_batch, inputs, metadata, fills)
        else:
            with record_function("compiled_llm.run_graph"):
                logits = self.run_graph(inputs, metadata, fills)
        for chunk in chunks:
            chunk.seq.num_computed += chunk.num_tokens
        return logits[:wanted]

    def _fills(self, chunks: Seq[ScheduledChunk], device_tokens: torch.Tensor | None) -> TokenFills | None:
        flat, dst, src = 0, [], []
        for chunk in chunks:
            flat += chunk.num_tokens
            tokens, end = chunk.seq.token_ids, chunk.seq.num_computed + chunk.num_tokens
            if chunk.fill_row is not None:
                if end != len(tokens):
                    raise ValueError("a chunk with a fill_row must end with the sequence's last token")
                dst.append(flat - 1)
                src.append(chunk.fill_row)
            elif tokens[end - 1] < 0:
                raise ValueError("a placeholder token (< 0) is computed without a fill_row to take it from")
        if not dst:
            return None
        if device_tokens is None:
            raise ValueError("chunks with a fill_row need device_tokens")
        return TokenFills(device_tokens, dst, src)
