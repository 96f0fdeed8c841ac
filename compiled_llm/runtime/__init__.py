"""Runtime: paged KV cache, sequences, and the model runner that executes one engine step."""

from compiled_llm.runtime.kv_cache import BlockAllocator, OutOfKVBlocks, PagedKVCache, default_num_kv_blocks
from compiled_llm.runtime.model_runner import STEP_INPUTS, ModelRunner
from compiled_llm.runtime.sequence import ScheduledChunk, Sequence

__all__ = [
    "STEP_INPUTS",
    "BlockAllocator",
    "ModelRunner",
    "OutOfKVBlocks",
    "PagedKVCache",
    "ScheduledChunk",
    "Sequence",
    "default_num_kv_blocks",
]
