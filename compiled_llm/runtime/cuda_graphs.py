"""Decode steps replayed as CUDA graphs: two graphs per captured batch size, used in turn.

A decode step of b sequences is padded to the smallest captured size >= b (padding tokens write to the
scratch block) and replayed over static input buffers; the attention backends first plan the step into
the fixed buffers of that graph, on the host. Each size has two graphs with separate buffers, used
alternately, so the host can prepare step n+1 while the GPU still runs step n; a caller only has to have
waited for step n before it prepares step n+2. Prefill and mixed steps, and batches larger than the
largest captured size, run the compiled graph directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

import torch
from torch.profiler import record_function

from compiled_llm.runtime.model_runner import ModelRunner
from compiled_llm.runtime.sequence import ScheduledChunk
from custom_ops import StepAttentionMetadata, planned_step

log = logging.getLogger("compiled_llm.cuda_graphs")

COPIES = 2  # graphs per batch size, used in turn


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch_size (and max_batch_size itself)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size] + list(range(8, max_batch_size, 8))
    return sorted(set(sizes + [max_batch_size]))


class _StaticInputs:
    """Device buffers a graph reads its step inputs from, for up to `largest` sequences."""

    def __init__(self, largest: int, max_blocks_per_seq: int, device: torch.device):
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.buffers = {
            "input_ids": zeros(largest),
            "position_ids": zeros(largest),
            "logits_indices": zeros(largest),
            "slot_mapping": zeros(largest),
            "block_table": zeros(largest, max_blocks_per_seq, dtype=torch.int32),
            "query_start_loc": zeros(largest + 1, dtype=torch.int32),
            "seq_lens": zeros(largest, dtype=torch.int32),
        }

    def views(self, batch_size: int) -> dict[str, torch.Tensor]:
        views = {name: buffer[:batch_size] for name, buffer in self.buffers.items()}
        views["query_start_loc"] = self.buffers["query_start_loc"][: batch_size + 1]
        return views


class DecodeCudaGraphs:
    def __init__(self, runner: ModelRunner, batch_sizes: Seq[int]):
        self.runner = runner
        self.batch_sizes = sorted(set(batch_sizes))
        self._inputs = [_StaticInputs(self.batch_sizes[-1], runner.max_blocks_per_seq, runner.device) for _ in range(COPIES)]
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._next_copy = 0
        self.capture_s = 0.0
        self.memory_bytes = 0
        self.replays = 0

    def batch_size_for(self, chunks: Seq[ScheduledChunk]) -> int | None:
        """The captured size to replay for this step, or None if it is not a decode step that fits."""
        if not chunks or len(chunks) > self.batch_sizes[-1]:
            return None
        if any(c.num_tokens != 1 or c.logits != "last" for c in chunks):
            return None
        return next(size for size in self.batch_sizes if size >= len(chunks))

    def _load(self, key: tuple[int, int], inputs: dict[str, torch.Tensor], metadata: StepAttentionMetadata,
              device_input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        batch_size, copy = key
        with record_function("compiled_llm.plan"):
            for planner in self.runner.planners.values():
                planner.plan(metadata, cuda_graph_key=key)
        views = self._inputs[copy].views(batch_size)
        with record_function("compiled_llm.copy_inputs"):
            for name, view in views.items():
                if name == "block_table":  # the step's table is as wide as its longest sequence needs
                    view = view[:, : inputs[name].shape[1]]
                view.copy_(inputs[name], non_blocking=True)
            if device_input_ids is not None:  # tokens sampled on the device by the previous step
                views["input_ids"][: len(device_input_ids)].copy_(device_input_ids, non_blocking=True)
        return views

    def capture(self) -> None:
        """Capture every batch size (each twice), largest first, into one memory pool."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.runner.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for batch_size in reversed(self.batch_sizes):
            for copy in range(COPIES):
                inputs, metadata, _ = self.runner.step_inputs([], pad_to_seqs=batch_size)  # all padding
                views = {**self._load((batch_size, copy), inputs, metadata), **self.runner.kv_cache.tensors}
                with planned_step(self.runner.planners):
                    self.runner.graph(views)  # warm-up outside the capture: lazy initialisation, allocator
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self.runner.graph(views)
                self._graphs[(batch_size, copy)] = (graph, logits)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.runner.device)[0])
        log.info("captured %d CUDA graphs (%s, x%d) in %.1f s", len(self._graphs), self.batch_sizes, COPIES, self.capture_s)

    def replay(self, batch_size: int, inputs: dict[str, torch.Tensor], metadata: StepAttentionMetadata,
               device_input_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        key = (batch_size, self._next_copy)
        self._next_copy = (self._next_copy + 1) % COPIES
        graph, logits = self._graphs[key]
        self._load(key, inputs, metadata, device_input_ids)
        with record_function("compiled_llm.replay"):
            graph.replay()
        self.replays += 1
        return logits
