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


def check_decode_graph_replay(backend: str, planners: dict | None = None, max_context: int = 300) -> None:
    """One decode step of 4 sequences (Llama-3.1-8B's heads) captured as a CUDA graph through `backend` (with
    `planners` in scope), replayed over steps of other lengths and block tables: each equals the reference op."""
    from custom_ops import planned_step

    ops = torch.ops.compiled_llm
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    heads, kv_heads, head_dim = 32, 8, 128
    steps = [[(rng.randrange(0, max_context), 1) for _ in range(4)] for _ in range(3)]
    built = [random_step(rng, s, 16, heads, kv_heads, head_dim, torch.bfloat16)[0] for s in steps]
    blocks = max(a[3].shape[0] for a in built)
    width = max(a[5].shape[1] for a in built)
    static = [torch.zeros_like(a) for a in built[0][:3]]  # q, k, v
    cache = torch.zeros(blocks, *built[0][3].shape[1:], dtype=torch.bfloat16, device="cuda")
    slots = torch.zeros(4, dtype=torch.int64, device="cuda")
    table = torch.zeros(4, width, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(5, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(4, dtype=torch.int32, device="cuda")
    out = torch.empty_like(static[0])

    def run():
        with planned_step(planners or {}):
            out.copy_(ops.paged_attention(*static, cache, slots, table, query_start_loc, seq_lens, 0, head_dim**-0.5,
                                          0, 0.0, None, backend))  # fmt: skip

    def load(args):
        for dst, src in zip(static, args[:3]):
            dst.copy_(src)
        cache.zero_()
        cache[: args[3].shape[0]].copy_(args[3].nan_to_num(0.0))
        slots.copy_(args[4])
        table.zero_()
        table[:, : args[5].shape[1]].copy_(args[5])
        seq_lens.copy_(args[7])

    load(built[0])
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for args in built[1:]:
        load(args)
        graph.replay()
        expected = ops.paged_attention(*args[:3], args[3].nan_to_num(0.0), *args[4:], 0, head_dim**-0.5, 0, 0.0, None,
                                       "reference")  # fmt: skip
        torch.cuda.synchronize()
        error = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert error < 1e-2, f"seed {seed}: relative error {error:.2e}"
