"""Random engine steps over a paged KV cache, for checking attention backends against the reference."""

from __future__ import annotations

import math
import random

import torch

from custom_ops import StepAttentionMetadata


def random_step(rng: random.Random, shapes, block_size, num_heads, num_kv_heads, head_dim, dtype,
                device="cuda", cache_dtype=None, values_in_keys=False):  # fmt: skip
    """A step over sequences with `shapes` = [(cached, new)]: cache filled with NaN except their prefixes. With
    `values_in_keys` the values are the keys, and the cache has one plane (paged.py)."""
    cache_dtype = cache_dtype or dtype
    widths = [math.ceil((c + n) / block_size) for c, n in shapes]
    pool = list(range(1, sum(widths) + 8))  # block 0 is the scratch block
    rng.shuffle(pool)
    shape = (len(pool) + 1, 1 if values_in_keys else 2, block_size, num_kv_heads, head_dim)
    kv_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    tables, slots, k_new, v_new = [], [], [], []
    for (cached, new), width in zip(shapes, widths):
        blocks, pool = pool[:width], pool[width:]
        tables.append(blocks + [0] * (max(widths) - width))
        keys = torch.randn(cached + new, num_kv_heads, head_dim, dtype=dtype, device=device)
        values = keys if values_in_keys else torch.randn(cached + new, num_kv_heads, head_dim, dtype=dtype, device=device)
        for p in range(cached + new):
            block, offset = blocks[p // block_size], p % block_size
            if p < cached:
                kv_cache[block, 0, offset], kv_cache[block, -1, offset] = keys[p], values[p]
            else:
                slots.append(block * block_size + offset)
        k_new.append(keys[cached:])
        v_new.append(values[cached:])
    total = sum(n for _, n in shapes)
    q = torch.randn(total, num_heads, head_dim, dtype=dtype, device=device)
    qsl = [0]
    for _, n in shapes:
        qsl.append(qsl[-1] + n)
    host = dict(
        block_table=torch.tensor(tables, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in shapes], dtype=torch.int32),
    )
    metadata = StepAttentionMetadata(**host, block_size=block_size, max_blocks_per_seq=32,
                                     is_decode=all(n == 1 for _, n in shapes))  # fmt: skip
    k_new = torch.cat(k_new)
    args = [q, k_new, k_new if values_in_keys else torch.cat(v_new), kv_cache, torch.tensor(slots, device=device)]
    args += [host[name].to(device) for name in ("block_table", "query_start_loc", "seq_lens")]
    return args, metadata
