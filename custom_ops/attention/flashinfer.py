"""The `flashinfer` paged-attention backend: FlashInfer's paged prefill and decode kernels.

Host side (`FlashInferPlanner.plan`, once per engine step, outside any graph): turn the step's block table
into FlashInfer's page layout and plan one wrapper per attention group (layers that share heads, head_dim,
scale, sliding window and soft-cap). Device side (`_run`, once per layer, graph-safe): write the layer's
K/V into the cache, then run the planned wrapper. Decode steps replayed as CUDA graphs use one wrapper per
captured batch size, all over one set of fixed page-index buffers (prefixes of it) that planning fills in
place: those copies are queued on the stream behind the step in flight, so the graphs can share them, and
their memory is that of the largest batch's pages, not the sum over every captured size.

FlashInfer is imported on first use, so the package is only needed where this backend is chosen.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Hashable

import torch

from custom_ops.attention.backends import (
    AttentionBackend,
    LayerAttentionFeatures,
    StepAttentionMetadata,
    active_planner,
    register_attention_backend,
)
from custom_ops.attention.kv_cache_write import write_kv_cache_fast

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
WORKSPACE_BYTES = 256 << 20
# Tensor-core decode pays off once this many query heads share a KV head (FlashInfer's own advice).
TENSOR_CORE_MIN_GROUP = 4


def _unsupported(features: LayerAttentionFeatures) -> str | None:
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (pip install compiled-llm[gpu])"
    if features.dtype not in SUPPORTED_DTYPES:
        return f"dtype {features.dtype} (needs bfloat16 or float16)"
    if features.values_in_keys:  # its wrappers take a K and a V cache; an MLA latent cache has one plane
        return "values kept in the keys (a latent cache of one plane)"
    if features.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {features.head_dim} (supports {SUPPORTED_HEAD_DIMS})"
    if features.has_sinks:
        return "attention sinks"
    if features.cache_dtype not in (features.dtype, torch.float8_e4m3fn):
        return f"KV cache dtype {features.cache_dtype}"
    return None


def paged_kv_layout(
    metadata: StepAttentionMetadata, pinned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's (kv_indptr [S+1], kv_indices [pages], kv_last_page_len [S]) from the block table, in
    pinned host memory if asked (plan() copies them to the GPU; from pageable memory that copy would wait
    for the GPU to drain)."""
    block_size = metadata.block_size
    pages = (metadata.seq_lens + block_size - 1) // block_size  # [S]
    kv_indptr = torch.zeros(len(pages) + 1, dtype=torch.int32)
    torch.cumsum(pages, 0, out=kv_indptr[1:])
    used = torch.arange(metadata.block_table.shape[1])[None, :] < pages[:, None]
    kv_indices = metadata.block_table[used].to(torch.int32)
    last_page_len = (metadata.seq_lens - (pages - 1) * block_size).to(torch.int32)
    if pinned:
        return kv_indptr.pin_memory(), kv_indices.pin_memory(), last_page_len.pin_memory()
    return kv_indptr, kv_indices, last_page_len


class FlashInferPlanner:
    """Owns the FlashInfer wrappers of one compiled model and plans them each step."""

    def __init__(self, layers: dict[int, LayerAttentionFeatures], block_size: int, device: torch.device):
        import flashinfer

        self._flashinfer = flashinfer
        self.block_size = block_size
        self.device = device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.groups: dict[LayerAttentionFeatures, list[int]] = {}
        for layer_idx, features in sorted(layers.items()):
            self.groups.setdefault(features, []).append(layer_idx)
        self._prefill = {f: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD") for f in self.groups}
        self._decode = {f: self._decode_wrapper(f) for f in self.groups}
        self._graph_decode: dict[tuple[Hashable, LayerAttentionFeatures], object] = {}
        self._graph_pages: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # indptr, indices, last len
        self._layer_wrapper: dict[int, object] = {}
        # plan() fills a wrapper's pinned host buffer and queues a copy from it without waiting; planning
        # the same wrapper again before that copy ran would corrupt the plan of the step in flight.
        self._plan_copied: dict[int, torch.cuda.Event] = {}

    def _decode_wrapper(self, features: LayerAttentionFeatures, graph_batch: int | None = None, max_pages: int = 0):
        tensor_cores = features.num_q_heads // features.num_kv_heads >= TENSOR_CORE_MIN_GROUP
        if graph_batch is None:
            return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=tensor_cores
            )
        indptr, indices, last_page_len = self._graph_page_buffers(graph_batch, max_pages)
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=indptr[: graph_batch + 1], paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=last_page_len[:graph_batch],
        )  # fmt: skip

    def _graph_page_buffers(self, graph_batch: int, max_pages: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The page-index buffers every graph-mode wrapper uses, grown where a batch needs more (graphs are
        captured largest first, so that happens once; wrappers made before keep the buffers they have)."""
        if self._graph_pages is None or len(self._graph_pages[2]) < graph_batch or len(self._graph_pages[1]) < max_pages:
            int32 = dict(dtype=torch.int32, device=self.device)
            self._graph_pages = (torch.zeros(graph_batch + 1, **int32), torch.zeros(max_pages, **int32),
                                 torch.zeros(graph_batch, **int32))  # fmt: skip
        return self._graph_pages

    @staticmethod
    def _attention_kwargs(features: LayerAttentionFeatures) -> dict:
        return dict(
            sm_scale=features.scale,
            # HF's window counts the query itself; FlashInfer's window_left counts the keys before it.
            window_left=features.sliding_window - 1 if features.sliding_window > 0 else -1,
            logits_soft_cap=features.softcap if features.softcap > 0 else None,
            q_data_type=features.dtype,
            kv_data_type=features.cache_dtype,
        )

    def plan(self, metadata: StepAttentionMetadata, cuda_graph_key: Hashable | None = None) -> None:
        kv_indptr, kv_indices, last_page_len = paged_kv_layout(metadata, pinned=True)
        # On the device already: a graph-mode plan() copies host indices with a blocking copy, which would
        # wait for the step still running on the GPU.
        kv_indices = kv_indices.to(self.device, non_blocking=True)
        batch = len(metadata.seq_lens)
        for features, layer_ids in self.groups.items():
            shape = (features.num_q_heads, features.num_kv_heads, features.head_dim, self.block_size)
            if metadata.is_decode:
                if cuda_graph_key is None:
                    wrapper = self._decode[features]
                else:  # one wrapper, with its own fixed buffers, per captured graph
                    key = (cuda_graph_key, features)
                    if key not in self._graph_decode:
                        max_pages = batch * metadata.max_blocks_per_seq
                        self._graph_decode[key] = self._decode_wrapper(features, batch, max_pages)
                    wrapper = self._graph_decode[key]
                self._wait_for_last_plan(wrapper)
                wrapper.plan(kv_indptr, kv_indices, last_page_len, *shape, **self._attention_kwargs(features))
            else:
                wrapper = self._prefill[features]
                self._wait_for_last_plan(wrapper)
                wrapper.plan(metadata.query_start_loc, kv_indptr, kv_indices, last_page_len, *shape,
                             causal=True, **self._attention_kwargs(features))  # fmt: skip
            self._plan_copied.setdefault(id(wrapper), torch.cuda.Event()).record()
            for layer_idx in layer_ids:
                self._layer_wrapper[layer_idx] = wrapper

    def _wait_for_last_plan(self, wrapper) -> None:
        copied = self._plan_copied.get(id(wrapper))
        if copied is not None:  # the host may run one step ahead of the GPU, not two
            copied.synchronize()

    def run(self, layer_idx: int, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> None:
        self._layer_wrapper[layer_idx].run(q, kv_cache, out=out)


def _run(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
         layer_idx, scale, sliding_window, softcap, sinks) -> None:  # fmt: skip
    write_kv_cache_fast(k, v, kv_cache, slot_mapping)
    active_planner("flashinfer").run(layer_idx, q, kv_cache, out)


register_attention_backend(
    AttentionBackend(
        "flashinfer",
        _run,
        devices=("cuda",),
        unsupported=_unsupported,
        make_planner=FlashInferPlanner,
        cuda_graph_safe=True,
    )
)
