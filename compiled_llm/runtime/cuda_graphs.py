"""Decode steps replayed as CUDA graphs, one graph per captured batch size.

A decode step of b sequences is padded to the smallest captured size >= b (padding tokens write to the
scratch block) and replayed over static input buffers; the attention backends first plan the step into
the fixed buffers of that graph, on the host. The host may prepare step n+1 while the GPU still runs
step n: every write into the static buffers is a copy queued on the stream behind step n, from pinned
memory, and planners wait for their own previous copies (see custom_ops/attention/flashinfer.py). The logits a
replay returns live in the graph's output buffer: read them before the next replay of that size.
Prefill and mixed steps, and batches larger than the largest captured size, run the compiled graph
directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

import torch
from torch.profiler import record_function

from compiled_llm.runtime.model_runner import STEP_INPUT_DTYPES, ModelRunner, TokenFills
from compiled_llm.runtime.sequence import ScheduledChunk
from custom_ops import StepAttentionMetadata, planned_step

log = logging.getLogger("compiled_llm.cuda_graphs")


# Up to this batch size every multiple of 8 is captured; above it, 8 sizes per doubling.
FINE_BUCKETS_UP_TO = 256


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, every multiple of 8 up to 256, then steps of an eighth of the power of two below (288,
    320, ..., 512, 576, ..., 1024, 1152, ...), and max_batch_size itself. A step then pads at most 7 rows
    up to 256 and at most 1/8 of its batch above, and a doubling of max_batch_size costs 8 graphs more,
    not max_batch_size / 8."""
    sizes = {size for size in (1, 2, 4) if size < max_batch_size} | {max_batch_size}
    size = 8
    while size < max_batch_size:
        sizes.add(size)
        size += 8 if size < FINE_BUCKETS_UP_TO else 1 << (size.bit_length() - 4)
    return sorted(sizes)


def caused_by_out_of_memory(error: BaseException | None) -> bool:
    """Whether `error` is a CUDA OOM, or was raised from or while handling one (ending a graph capture that
    an OOM broke off raises an error of its own; Inductor wraps one met while autotuning)."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


class _StaticInputs:
    """Device buffers a graph reads its step inputs from, for up to `largest` sequences."""

    def __init__(self, largest: int, max_blocks_per_seq: int, device: torch.device):
        shapes = {"block_table": (largest, max_blocks_per_seq), "query_start_loc": (largest + 1,)}
        self.buffers = {
            name: torch.zeros(shapes.get(name, (largest,)), dtype=dtype, device=device)
            for name, dtype in STEP_INPUT_DTYPES.items()
        }

    def views(self, batch_size: int) -> dict[str, torch.Tensor]:
        views = {name: buffer[:batch_size] for name, buffer in self.buffers.items()}
        views["query_start_loc"] = self.buffers["query_start_loc"][: batch_size + 1]
        return views


class DecodeCudaGraphs:
    def __init__(self, runner: ModelRunner, batch_sizes: Seq[int]):
        self.runner = runner
        self.batch_sizes = sorted(set(batch_sizes))
        self._inputs = _StaticInputs(self.batch_sizes[-1], runner.max_blocks_per_seq, runner.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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

    def _load(self, batch_size: int, inputs: dict[str, torch.Tensor], metadata: StepAttentionMetadata,
              fills: TokenFills | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        with record_function("compiled_llm.plan"):
            for planner in self.runner.planners.values():
                planner.plan(metadata, cuda_graph_key=batch_size)
        views = self._inputs.views(batch_size)
        with record_function("compiled_llm.copy_inputs"):
            for name, view in views.items():
                if name == "block_table":  # the step's table is as wide as its longest sequence needs
                    view = view[:, : inputs[name].shape[1]]
                view.copy_(inputs[name], non_blocking=True)
            if fills is not None:  # tokens sampled on the device by the previous step
                fills.apply(views["input_ids"])
        return views

    def capture(self) -> None:
        """Capture every batch size, largest first, into one memory pool."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.runner.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for batch_size in reversed(self.batch_sizes):
            try:
                self._graphs[batch_size] = self._capture_one(batch_size, pool)
            except Exception as error:
                if not caused_by_out_of_memory(error):
                    raise
                kv_gib = self.runner.kv_cache.nbytes / 2**30
                raise ValueError(
                    f"out of GPU memory capturing the decode CUDA graph of batch size {batch_size} "
                    f"({len(self._graphs)} of {len(self.batch_sizes)} captured; the KV cache holds {kv_gib:.1f} GiB): "
                    "lower kv_cache_memory_fraction or num_kv_blocks, or max_batch_size (or cuda_graph_batch_sizes)"
                ) from error
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.runner.device)[0])
        log.info("captured %d CUDA graphs (%s) in %.1f s", len(self._graphs), self.batch_sizes, self.capture_s)

    def _capture_one(self, batch_size: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs, metadata, _ = self.runner.step_inputs([], pad_to_seqs=batch_size)  # all padding
        views = {**self._load(batch_size, inputs, metadata), **self.runner.kv_cache.tensors}
        with planned_step(self.runner.planners):
            self.runner.graph(views)  # warm-up outside the capture: lazy initialisation, allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.runner.graph(views)
        return graph, logits

    def replay(self, batch_size: int, inputs: dict[str, torch.Tensor], metadata: StepAttentionMetadata,
               fills: TokenFills | None = None) -> torch.Tensor:  # fmt: skip
        graph, logits = self._graphs[batch_size]
        self._load(batch_size, inputs, metadata, fills)
        with record_function("compiled_llm.replay"):
            graph.replay()
        self.replays += 1
        return logits
