"""`sdpa` paged-attention backend: PyTorch's fused `scaled_dot_product_attention` over keys and values
gathered from the paged cache. The fast backend on CPU (and a fallback on CUDA); layers with a soft-cap or
sinks (which SDPA lacks) or an fp8 cache fall back to `reference`.

On a CPU a layer's attention costs what its torch calls cost, not what it reads: a decode step of a small
model attends over a few hundred keys. So everything that is the same for every layer of a step (which
cache rows hold each sequence's keys, which queries attend together, their masks) is worked out once per
step by `SdpaPlanner.plan`, and a layer is a handful of calls: write the step's keys and values, gather each
group's keys and values (one `index_select` each), one SDPA call per group.

Rows: a contiguous cache [num_blocks, 2, block_size, Hkv, D] viewed as [num_blocks * 2 * block_size, Hkv, D]
holds the key of slot s (block s // B, offset s % B, B = block_size) at row s + (s // B) * B, and its value
B rows further; a cache of one plane (values in the keys, paged.py) holds both at row s.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from custom_ops.attention.backends import (
    AttentionBackend,
    LayerAttentionFeatures,
    StepAttentionMetadata,
    planner_in_scope,
    register_attention_backend,
)


def _unsupported(features: LayerAttentionFeatures) -> str | None:
    if features.softcap > 0:
        return "soft-cap"
    if features.has_sinks:
        return "attention sinks"
    if features.cache_dtype != features.dtype:
        return f"a {str(features.cache_dtype).removeprefix('torch.')} KV cache for {str(features.dtype).removeprefix('torch.')} keys"
    return None


@dataclass(frozen=True)
class GroupKeys:
    """What one group attends to under one sliding window."""

    rows: torch.Tensor  # [planes * B * L] int64 rows of the cache view: the keys', then the values' (block_size further)
    mask: torch.Tensor | None  # bool, True = attend: [B, 1, 1, L] (decode) or [n, L] (a prefill chunk)
    is_causal: bool  # a fresh prefill without a window: SDPA's own causal mask, no mask tensor
    length: int  # L


@dataclass
class AttentionGroup:
    """Queries that attend in one SDPA call: every decode token of the step (one per sequence), or the n
    tokens of one prefill chunk. Their keys depend on the layer's sliding window; built once per window."""

    query_rows: slice | torch.Tensor  # rows of q and out
    block_rows: torch.Tensor  # [B, W] int64: the sequences' block tables
    seq_lens: torch.Tensor  # [B] int64
    num_queries: int  # n: queries per sequence (1 for decode)
    block_size: int
    device: torch.device
    _by_window: dict[tuple[int, int], GroupKeys] = field(default_factory=dict)

    @property
    def is_decode(self) -> bool:
        return self.num_queries == 1

    def keys(self, window: int, planes: int) -> GroupKeys:
        if (window, planes) not in self._by_window:
            self._by_window[window, planes] = self._build(window, planes)
        return self._by_window[window, planes]

    def _build(self, window: int, planes: int) -> GroupKeys:
        n, lens, bs = self.num_queries, self.seq_lens, self.block_size
        first_query = lens - n  # position of each sequence's first query
        # Keys from the first the first query may see to the last: all, or the window's
        start = (first_query - window + 1).clamp(min=0) if window > 0 else torch.zeros_like(lens)
        spans = lens - start
        length = int(spans.max())
        j = torch.arange(length)
        # Past its span a sequence reads its own first key again: a real, written row (unwritten cache rows
        # may hold anything, NaN included, which even a masked score would spread); the mask drops it.
        positions = torch.where(j < spans[:, None], start[:, None] + j, start[:, None])  # [B, L]
        blocks = self.block_rows.gather(1, positions // bs)
        key_rows = (blocks * (planes * bs) + positions % bs).flatten()
        mask, is_causal = None, False
        if self.is_decode:
            if bool((spans != length).any()):
                mask = (j < spans[:, None])[:, None, None, :]
        elif int(start) == 0 and n == length and window == 0:
            is_causal = True  # SDPA's causal mask is top-left aligned: right only when queries are all tokens
        else:
            query_pos = first_query + torch.arange(n)[:, None]  # [n, 1]
            key_pos = start + j[None, :]  # [1, L]
            mask = key_pos <= query_pos
            if window > 0:
                mask &= key_pos > query_pos - window
        to = self.device
        rows = (torch.cat([key_rows, key_rows + bs]) if planes == 2 else key_rows).to(to)
        return GroupKeys(rows, None if mask is None else mask.to(to), is_causal, length)


@dataclass
class SdpaStepPlan:
    num_tokens: int
    block_size: int
    groups: list[AttentionGroup]
    metadata: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # block table, query starts, lengths (on the device)

    def plans(self, block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> bool:
        """Whether this plan is for a step with these arguments, compared in full: a plan used for another
        step would attend to the wrong keys, silently. (On CUDA the comparison waits for the device, one
        of the reasons this backend is not replayed in CUDA graphs.)"""
        given = (block_table, query_start_loc, seq_lens)
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(given, self.metadata))

    @classmethod
    def build(cls, block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
              block_size: int, device: torch.device) -> SdpaStepPlan:  # fmt: skip
        """From host copies of the step's metadata (see paged.py)."""
        starts = query_start_loc.tolist()
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        table, lens = block_table.long(), seq_lens.long()
        groups = []
        decode = [s for s, n in enumerate(query_lens) if n == 1]
        if decode:
            rows = [starts[s] for s in decode]
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            query_rows = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=device)
            index = torch.tensor(decode)
            groups.append(AttentionGroup(query_rows, table[index], lens[index], 1, block_size, device))
        for s, n in enumerate(query_lens):
            if n > 1:
                groups.append(AttentionGroup(slice(starts[s], starts[s + 1]), table[s : s + 1], lens[s : s + 1], n,
                                             block_size, device))  # fmt: skip
        on_device = tuple(t.to(device) for t in (block_table, query_start_loc, seq_lens))
        return cls(starts[-1], block_size, groups, on_device)


class SdpaPlanner:
    """Plans each step once for every layer (see the module docstring)."""

    def __init__(self, layers: dict[int, LayerAttentionFeatures], block_size: int, device: torch.device):
        self.device = device
        self.step: SdpaStepPlan | None = None

    def plan(self, metadata: StepAttentionMetadata, cuda_graph_key: Hashable | None = None) -> None:
        self.step = SdpaStepPlan.build(metadata.block_table, metadata.query_start_loc, metadata.seq_lens,
                                       metadata.block_size, self.device)  # fmt: skip


def _step_plan(kv_cache, block_table, query_start_loc, seq_lens) -> SdpaStepPlan:
    """The runner's plan for this step, or (a direct call of the op) one made here from the arguments."""
    planner = planner_in_scope("sdpa")
    if planner is not None:
        step = planner.step
        if step is None or step.block_size != kv_cache.shape[2] or not step.plans(block_table, query_start_loc, seq_lens):
            raise RuntimeError("paged_attention(backend='sdpa') runs a step other than the one planned")
        return step
    host = [t.cpu() for t in (block_table, query_start_loc, seq_lens)]
    return SdpaStepPlan.build(*host, kv_cache.shape[2], kv_cache.device)


def _run(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
         layer_idx, scale, sliding_window, softcap, sinks) -> None:  # fmt: skip
    if not kv_cache.is_contiguous():
        raise ValueError(f"paged_attention(backend='sdpa'): the KV cache of layer {layer_idx} must be contiguous")
    step = _step_plan(kv_cache, block_table, query_start_loc, seq_lens)
    if step.num_tokens != q.shape[0]:
        raise RuntimeError(f"paged_attention(backend='sdpa'): {q.shape[0]} queries for a step planned with {step.num_tokens}")
    bs = step.block_size
    planes = kv_cache.shape[1]
    rows = kv_cache.view(-1, *kv_cache.shape[-2:])  # [num_blocks * planes * block_size, Hkv, D]
    key_rows = slot_mapping + slot_mapping // bs * bs * (planes - 1)
    rows.index_copy_(0, key_rows, k)
    if planes == 2:
        rows.index_copy_(0, key_rows + bs, v)
    for group in step.groups:
        keys = group.keys(sliding_window, planes)
        kv = rows.index_select(0, keys.rows).view(planes, -1, keys.length, *rows.shape[1:]).transpose(2, 3)  # [planes, B, Hkv, L, D]
        if group.is_decode:  # [B, Hq, 1, D]
            o = F.scaled_dot_product_attention(q[group.query_rows].unsqueeze(2), kv[0], kv[-1], attn_mask=keys.mask,
                                               scale=scale, enable_gqa=True)  # fmt: skip
            out[group.query_rows] = o.squeeze(2)
        else:  # one sequence's n queries: [1, Hq, n, D]
            o = F.scaled_dot_product_attention(q[group.query_rows].transpose(0, 1)[None], kv[0], kv[-1], attn_mask=keys.mask,
                                               is_causal=keys.is_causal, scale=scale, enable_gqa=True)  # fmt: skip
            out[group.query_rows] = o[0].transpose(0, 1)


register_attention_backend(
    AttentionBackend("sdpa", _run, devices=("cpu", "cuda"), unsupported=_unsupported, make_planner=SdpaPlanner)
)
