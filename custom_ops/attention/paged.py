"""`compiled_llm::paged_attention`: attention for a flat, mixed batch over a paged KV cache.

One call serves every sequence of an engine step (prefill chunks and decode tokens mixed): the T new
tokens of S sequences are concatenated; sequence s owns tokens query_start_loc[s]:query_start_loc[s+1],
which are its last tokens; seq_lens[s] counts all of its tokens including them. A sequence may have no new
token (the reference passes over it), so T == S does not mean one token each (backends.decode_shaped; tested by
tests/test_triton_attention.py's "tokens-as-sequences" step). The op first writes the
new tokens' keys/values into the cache at `slot_mapping`, then each new token attends causally to its
sequence's cached tokens found through `block_table`.

KV cache layout (FlashInfer's NHD paged layout): kv_cache[num_blocks, 2, block_size, Hkv, D], index 0 of
dim 1 holds keys, 1 holds values; token p of sequence s lives in block block_table[s, p // block_size]
at offset p % block_size, i.e. at slot block * block_size + offset.

A layer whose values are its keys (`v` is `k`: DeepSeek's multi-head latent attention in its absorbed form, where
both are the compressed latent plus its RoPE part) has a cache of one plane, kv_cache[num_blocks, 1, block_size,
Hkv, D]: every backend reads that plane for values too, and writes `k` only.
"""

from __future__ import annotations

import torch

from custom_ops.attention.backends import AttentionBackend, get_attention_backend, register_attention_backend
from custom_ops.attention.reference import attend


_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
# Registered without custom_op's Python wrapper (as compiled_llm::linear is): a step that is not replayed from
# a CUDA graph calls it once per layer, and on a CPU the wrapper costs as much as a short decode attention.
_LIBRARY.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, Tensor block_table, "
    "Tensor query_start_loc, Tensor seq_lens, int layer_idx, float scale, int sliding_window, float softcap, "
    "Tensor? sinks, str backend) -> Tensor"
)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # [T] int64: cache slot of each new token (padding tokens: a scratch block)
    block_table: torch.Tensor,  # [S, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [S + 1] int32
    seq_lens: torch.Tensor,  # [S] int32
    layer_idx: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: torch.Tensor | None,  # [Hq]
    backend: str,
) -> torch.Tensor:  # [T, Hq, D]
    """Write this step's K/V into the paged cache, then attend (see the module docstring)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    get_attention_backend(backend).run(
        out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
        layer_idx, scale, sliding_window, softcap, sinks,
    )  # fmt: skip
    return out


def _paged_attention_fake(q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens, layer_idx, scale,
                          sliding_window, softcap, sinks, backend):  # fmt: skip
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("paged_attention", paged_attention, _device)
torch.library.register_fake("compiled_llm::paged_attention", _paged_attention_fake, lib=_LIBRARY)


def saturation_limit(dtype: torch.dtype) -> float:
    """Where values written into a cache of `dtype` saturate: fp8's largest value; 0.0 (none) otherwise."""
    return torch.finfo(dtype).max if dtype.itemsize == 1 else 0.0


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast keys or values for the cache; into fp8, out-of-range values saturate (scale 1)."""
    limit = saturation_limit(dtype)
    if limit:
        x = x.clamp(-limit, limit)
    return x.to(dtype)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache[slot // B, 0|1, slot % B] = k|v for every token (no host sync: safe in CUDA graphs); a one-plane
    cache (values in the keys) takes k only."""
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_cache[blocks, 0, offsets] = to_cache_dtype(k, kv_cache.dtype)
    if kv_cache.shape[1] == 2:
        kv_cache[blocks, 1, offsets] = to_cache_dtype(v, kv_cache.dtype)


def _gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [S, L, Hkv, D] of the sequences of `block_table`, L >= max_len (garbage past each length)."""
    blocks = block_table[:, : -(-max_len // kv_cache.shape[2])].long()  # [S, nb]
    cached = kv_cache[blocks]  # [S, nb, 2 or 1, block_size, Hkv, D]
    if cached.dtype.itemsize == 1:  # fp8: exact in float32, which attend() computes in anyway
        cached = cached.float()
    return cached[:, :, 0].flatten(1, 2), cached[:, :, -1].flatten(1, 2)  # one plane: the values are the keys


def paged_attention_over(attend_fn):
    """The paged-attention backend function that gathers each sequence's pages and calls `attend_fn`
    (attend()'s signature): decode tokens (one query per sequence) together, each prefill chunk alone."""

    def run(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
            layer_idx, scale, sliding_window, softcap, sinks) -> None:  # fmt: skip
        write_kv_cache(k, v, kv_cache, slot_mapping)
        features = (scale, sliding_window, softcap, sinks)
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        decode = (query_lens == 1).nonzero().flatten()
        if decode.numel():
            keys, values = _gather_kv(kv_cache, block_table[decode], int(seq_lens[decode].max()))
            rows = query_start_loc[decode].long()
            out[rows] = attend_fn(q[rows][:, None], keys, values, seq_lens[decode], *features)[:, 0]
        starts, lengths = query_start_loc.tolist(), seq_lens.tolist()
        for s in (query_lens > 1).nonzero().flatten().tolist():
            keys, values = _gather_kv(kv_cache, block_table[s : s + 1], lengths[s])
            rows = slice(starts[s], starts[s + 1])
            out[rows] = attend_fn(q[rows][None], keys, values, seq_lens[s : s + 1], *features)[0]

    return run


register_attention_backend(AttentionBackend("reference", paged_attention_over(attend), devices=("cpu", "cuda")))
