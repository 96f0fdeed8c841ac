"""Runtime: paged KV cache, sequences, the model runner that executes one engine step, CUDA graphs."""

from compiled_llm.runtime.block_pool import BlockPool, OutOfKVBlocks
from compiled_llm.runtime.cuda_graphs import DecodeCudaGraphs, caused_by_out_of_memory, default_batch_sizes
from compiled_llm.runtime.kv_cache import SCRATCH_BLOCK, PagedKVCache, check_kv_cache_fits, default_num_kv_blocks
from compiled_llm.runtime.model_runner import STEP_INPUTS, ModelRunner
from compiled_llm.runtime.sequence import ScheduledChunk, Sequence

__all__ = [
    "SCRATCH_BLOCK",
    "STEP_INPUTS",
    "BlockPool",
    "DecodeCudaGraphs",
    "ModelRunner",
    "OutOfKVBlocks",
    "PagedKVCache",
    "ScheduledChunk",
    "Sequence",
    "caused_by_out_of_memory",
    "default_batch_sizes",
    "check_kv_cache_fits",
    "default_num_kv_blocks",
]
