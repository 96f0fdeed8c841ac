"""The `triton` paged-attention backend: one Triton kernel for mixed prefill/decode steps, no FlashInfer.

Each program computes BLOCK_Q query tokens of one sequence against one KV head, for all GROUP query heads
that read that KV head (so a GQA group shares every key/value load), with an online softmax over tiles
of keys gathered through the block table. Programs find their sequence by a binary search over
`query_start_loc`, so the launch grid depends only on tensor shapes: no planning, no host sync, and a
decode step replays in a CUDA graph as it is.

Sequence s owns program blocks starting at query_start_loc[s] // BLOCK_Q + s, which leaves room for its
ceil(query_len / BLOCK_Q) blocks; T // BLOCK_Q + S programs per KV head cover every sequence, and those
past a sequence's last query exit at once.
"""

from __future__ import annotations

import importlib.util

import torch

from custom_ops.attention_backends import AttentionBackend, LayerAttentionFeatures, register_attention_backend
from custom_ops.kv_cache_write import write_kv_cache_fast

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KEY_TILE = 32  # keys per inner-loop step; any block size works, each key looks its block up


def _unsupported(features: LayerAttentionFeatures) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install compiled-llm[gpu])"
    if features.dtype not in SUPPORTED_DTYPES:
        return f"dtype {features.dtype} (supports {', '.join(str(d) for d in SUPPORTED_DTYPES)})"
    if features.cache_dtype not in (features.dtype, torch.float8_e4m3fn):
        return f"KV cache dtype {features.cache_dtype}"
    return None


def tile_shape(num_tokens: int, num_seqs: int, group: int) -> tuple[int, int]:
    """(BLOCK_M rows per program, BLOCK_Q query tokens per program). tl.dot needs 16 rows at least; a
    decode step has one token per sequence, so it takes the smallest tile, prefill a taller one."""
    import triton

    rows = 16 if num_tokens == num_seqs else 64
    block_m = max(rows, triton.next_power_of_2(group))
    return block_m, block_m // group


def triton_paged_attention(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
                           layer_idx, scale, sliding_window, softcap, sinks) -> None:  # fmt: skip
    import triton

    from custom_ops.triton_attention_kernel import paged_attention_kernel

    write_kv_cache_fast(k, v, kv_cache, slot_mapping)
    q = q if q.stride(-1) == 1 else q.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], kv_cache.shape[3]
    if num_tokens == 0:
        return
    group = num_heads // num_kv_heads
    block_m, block_q = tile_shape(num_tokens, num_seqs, group)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    paged_attention_kernel[grid](
        out, q, kv_cache, block_table, query_start_loc, seq_lens, sinks if sinks is not None else q,
        scale, softcap, sliding_window, num_seqs, kv_cache.shape[2],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_table.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, TILE=KEY_TILE,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        USE_SOFTCAP=softcap > 0, USE_WINDOW=sliding_window > 0, USE_SINKS=sinks is not None,
        IEEE_DOT=q.dtype == torch.float32,
    )  # fmt: skip


register_attention_backend(
    AttentionBackend(
        "triton", triton_paged_attention, devices=("cuda",), unsupported=_unsupported, cuda_graph_safe=True
    )
)
