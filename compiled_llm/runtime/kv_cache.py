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
    """kv_cache_<layer>[1 + num_blocks, planes, block_size, Hkv, D] for each paged layer (planes: keys and values,
    or the keys alone where they are the values too: `PagedLayer.kv_planes`), plus their allocator (`num_blocks`
    usable blocks and the scratch block)."""

    def __init__(self, layers: Sequence[PagedLayer], num_blocks: int, block_size: int, device: torch.device,
                 enable_prefix_caching: bool = False):  # fmt: skip
        self.layers = list(layers)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensors = {
            layer.cache_input: torch.zeros(
                1 + num_blocks, layer.kv_planes, block_size, layer.num_kv_heads, layer.head_dim, dtype=layer.dtype,
                device=device,
            )
            for layer in self.layers
        }
        self.allocator = BlockPool(num_blocks, block_size, enable_prefix_caching)

    @staticmethod
    def bytes_per_block(layers: Sequence[PagedLayer], block_size: int) -> int:
        return sum(l.kv_planes * block_size * l.num_kv_heads * l.head_dim * l.dtype.itemsize for l in layers)

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


# A CPU decodes few sequences at a time (each step reads every weight), and the memory a cache does not use
# is the model's and the user's: the default budget on a CPU, before kv_cache_memory_fraction.
CPU_KV_CACHE_BUDGET = 1 * GiB


def _free_memory(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_host_memory()


def check_kv_cache_fits(layers: Sequence[PagedLayer], num_blocks: int, block_size: int, device: torch.device,
                        reserved_bytes: int = 0) -> None:  # fmt: skip
    """Raise ValueError, naming num_kv_blocks and the most that fit, where the cache would not fit in the free
    memory less `reserved_bytes` (a failed allocation would say neither)."""
    block_bytes = PagedKVCache.bytes_per_block(layers, block_size)
    free = _free_memory(device) - reserved_bytes
    if (1 + num_blocks) * block_bytes > free:
        where = "GPU memory" if device.type == "cuda" else "available RAM"
        raise ValueError(
            f"num_kv_blocks={num_blocks} needs {(1 + num_blocks) * block_bytes / GiB:.2f} GiB, more than the "
            f"{max(free, 0) / GiB:.2f} GiB of {where} left for it: at most {max(int(free // block_bytes) - 1, 0)} fit"
        )


def default_num_kv_blocks(
    layers: Sequence[PagedLayer],
    block_size: int,
    max_batch_size: int,
    max_seq_len: int,
    memory_fraction: float,
    device: torch.device,
    reserved_bytes: int = 0,
) -> tuple[int, str]:
    """Blocks for `max_batch_size` full-length sequences, capped by the memory budget (see CompileConfig);
    `reserved_bytes` (peak activations of a step, CUDA graphs) are kept free on top. Returns the count and
    why, for the compile report."""
    wanted = max_batch_size * math.ceil(max_seq_len / block_size)
    one_sequence = math.ceil(max_seq_len / block_size)
    block_bytes = PagedKVCache.bytes_per_block(layers, block_size)
    if device.type == "cuda":
        budget = memory_fraction * torch.cuda.mem_get_info(device)[0] - reserved_bytes
        limit = most_limit = f"{memory_fraction:g} of free GPU memory"
        most = budget
    else:
        available = _available_host_memory()
        budget = memory_fraction * min(CPU_KV_CACHE_BUDGET, available // 8)
        limit = f"{memory_fraction:g} of min(1 GiB, available RAM / 8) on CPU"
        # What the budget may grow to, for one full sequence.
        most, most_limit = memory_fraction * available / 2, f"{memory_fraction:g} of half the available RAM on CPU"
        if budget < one_sequence * block_bytes <= most:
            budget = one_sequence * block_bytes
            limit = f"one sequence of max_seq_len on CPU (more than {limit})"
    affordable = int(budget // block_bytes)
    if affordable < one_sequence:
        raise ValueError(
            f"the KV cache budget ({most / GiB:.2f} GiB: {most_limit}) holds {int(most // block_bytes) * block_size} "
            f"tokens, fewer than one sequence of max_seq_len={max_seq_len}: lower max_seq_len, or raise "
            "kv_cache_memory_fraction or num_kv_blocks"
        )
    if wanted <= affordable:
        return wanted, f"sized for max_batch_size={max_batch_size} sequences of max_seq_len"
    return affordable, (f"capped at {limit} ({affordable * block_size} tokens; max_batch_size={max_batch_size} "
                        f"sequences of max_seq_len would take {wanted * block_size}); num_kv_blocks sets it")  # fmt: skip
