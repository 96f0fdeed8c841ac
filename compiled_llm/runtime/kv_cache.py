"""The paged KV cache: one block-paged tensor per attention layer and the allocator of their blocks.

Every layer shares the same block ids: block b of a sequence is block b in every layer's tensor, so one
allocator serves all layers. Block 0 is never handed out: padding tokens (of CUDA-graph batches) write
their keys and values there, so the write needs no mask and no host sync.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from compiled_llm.runtime.block_pool import BlockPool
from fx_passes import PagedLayer

GiB = 1 << 30

SCRATCH_BLOCK = 0


class PagedKVCache:
    """kv_cache_<layer>[1 + num_blocks, 2, block_size, Hkv, D] for each paged layer, plus their allocator
    (`num_blocks` usable blocks and the scratch block)."""

    def __init__(self, layers: Sequence[PagedLayer], num_blocks: int, block_size: int, device: torch.device,
                 enable_prefix_caching: bool = False):  # fmt: skip
        self.layers = list(layers)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensors = {
            layer.cache_input: torch.zeros(
                1 + num_blocks, 2, block_size, layer.num_kv_heads, layer.head_dim, dtype=layer.dtype, device=device
            )
            for layer in self.layers
        }
        self.allocator = BlockPool(num_blocks, block_size, enable_prefix_caching)

    @staticmethod
    def bytes_per_block(layers: Sequence[PagedLayer], block_size: int) -> int:
        return sum(2 * block_size * l.num_kv_heads * l.head_dim * l.dtype.itemsize for l in layers)

    @property
    def nbytes(self) -> int:
        return (1 + self.num_blocks) * self.bytes_per_block(self.layers, self.block_size)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_num_kv_blocks(
    layers: Sequence[PagedLayer],
    block_size: int,
    max_batch_size: int,
    max_seq_len: int,
    memory_fraction: float,
    device: torch.device,
    reserved_bytes: int = 0,
) -> int:
    """Blocks for `max_batch_size` full-length sequences, capped by the memory budget (see CompileConfig);
    `reserved_bytes` (peak activations of a step, CUDA graphs) are kept free on top."""
    wanted = max_batch_size * math.ceil(max_seq_len / block_size)
    if device.type == "cuda":
        budget = memory_fraction * torch.cuda.mem_get_info(device)[0] - reserved_bytes
    else:
        budget = memory_fraction * min(4 * GiB, _available_host_memory() // 2)
    affordable = int(budget // PagedKVCache.bytes_per_block(layers, block_size))
    one_sequence = math.ceil(max_seq_len / block_size)
    if affordable < one_sequence:
        raise ValueError(
            f"the KV cache budget ({budget / GiB:.2f} GiB) holds {affordable * block_size} tokens, fewer than one "
            f"sequence of max_seq_len={max_seq_len}: lower max_seq_len or raise kv_cache_memory_fraction/num_kv_blocks"
        )
    return min(wanted, affordable)
