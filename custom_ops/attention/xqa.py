"""The `xqa` paged-attention backend: decode steps through FlashInfer's XQA kernel (TensorRT-LLM's decode attention),
every other step through the `triton` backend's kernel.

Why: a 512-row decode step of an FP8 Llama-3.1-8B spends 36% of its GPU time in attention, at 2.5-2.8 TB/s with a
bf16 cache and 1.0-1.1 TB/s with an FP8 one (BENCHMARKS.md, "Where a 512-row FP8 decode step goes"); XQA is the
kernel TensorRT-LLM decodes with.

Numerics: XQA's generic kernel (mha.cu) converts each cached e4m3 key and value to the query's dtype (exactly) and
multiplies in that dtype with float32 sums, as the other backends do; the softmax probabilities are rounded to the
query's dtype before they weight the values (the Triton kernel's too; the reference keeps float32). Its Hopper FP8
kernel (mha_sm90.cu), which `flashinfer.xqa.xqa` picks for an FP8 cache on Hopper, would also round the query and
the probabilities to e4m3: other numerics, so this backend calls the module with that kernel off.

Host side (`XqaPlanner`, made at compile time): the JIT module of each kind of layer (FlashInfer builds it once, in
its cache) and one zeroed workspace, whose first part holds the semaphores of XQA's multi-block mode (each call
leaves them zero again). Device side (`_run`, graph-safe): write the layer's K/V into the cache, then XQA reads the
block table and sequence lengths as they are (no plan): the split of each sequence over CTAs depends only on the
batch and the block table's width, which a captured graph fixes.
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
    decode_shaped,
    register_attention_backend,
)
from custom_ops.attention.kv_cache_write import write_kv_cache_fast
from custom_ops.attention.triton import triton_paged_attention
from custom_ops.triton_runtime import pdl_launch_options

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)  # XQA's TOKENS_PER_PAGE
MAX_GROUP = 16  # query heads per KV head this backend takes (the sizes its kernel is built for in FlashInfer's tests)
# Multi-block mode, the only user of both parts, runs where batch x KV heads <= SMs / 2: at most ~SMs sub-sequences,
# each 256 B + group x 128 B x head_dim / 64 of scratch (mha.cu), and one uint32 semaphore per (sequence, KV head).
WORKSPACE_BYTES = 16 << 20
SEMAPHORE_BYTES = 1 << 20


def _unsupported(features: LayerAttentionFeatures) -> str | None:
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (pip install compiled-llm[gpu])"
    if importlib.util.find_spec("triton") is None:  # prefill and mixed steps run the triton backend's kernel
        return "triton is not installed (pip install compiled-llm[gpu])"
    return layer_unsupported(features)


def layer_unsupported(features: LayerAttentionFeatures) -> str | None:
    """Why XQA's kernel cannot run a layer with these features, or None."""
    if features.dtype not in SUPPORTED_DTYPES:
        return f"dtype {features.dtype} (needs bfloat16 or float16)"
    if features.values_in_keys:
        return "values kept in the keys (a latent cache of one plane)"
    if features.head_dim % 16 or not 16 <= features.head_dim <= 256:
        return f"head_dim {features.head_dim} (needs a multiple of 16 up to 256)"
    if features.softcap > 0:
        return "a soft-cap on the logits"
    if features.num_q_heads // features.num_kv_heads > MAX_GROUP:
        return f"{features.num_q_heads // features.num_kv_heads} query heads per KV head (at most {MAX_GROUP})"
    if features.cache_dtype not in (features.dtype, torch.float8_e4m3fn):
        return f"KV cache dtype {features.cache_dtype}"
    return None


class XqaPlanner:
    """The XQA modules of one compiled model's kinds of layer, and the workspace they share. plan() only notes whether
    every sequence of the step has one token: XQA reads the block table and sequence lengths on the device."""

    def __init__(self, layers: dict[int, LayerAttentionFeatures], block_size: int, device: torch.device):
        from flashinfer.xqa import get_xqa_module

        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"attention_backend 'xqa' needs a KV-cache block size of {SUPPORTED_BLOCK_SIZES}, "
                             f"not {block_size}")  # fmt: skip
        if torch.cuda.get_device_capability(device)[0] not in (9, 10, 12):
            raise ValueError(f"attention_backend 'xqa' runs on compute capability 9.0, 10.x and 12.x GPUs, not "
                             f"{torch.cuda.get_device_name(device)}")  # fmt: skip
        self.block_size = block_size
        self.one_token_each = True  # until a plan() says otherwise
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.pdl = bool(pdl_launch_options(workspace).get("launch_pdl"))  # as our kernels launch on this device
        self.semaphores, self.scratch = workspace[:SEMAPHORE_BYTES], workspace[SEMAPHORE_BYTES:]
        with torch.cuda.device(device):  # loading a module sets its kernel's shared-memory limit on this device only
            self.modules = {
                layer_idx: get_xqa_module(
                    features.dtype,
                    features.cache_dtype,
                    block_size,
                    features.head_dim,
                    features.num_q_heads // features.num_kv_heads,
                    features.sliding_window > 0,
                    features.dtype,
                    1,
                )
                for layer_idx, features in layers.items()
            }

    def plan(self, metadata: StepAttentionMetadata, cuda_graph_key: Hashable | None = None) -> None:
        # As many tokens as sequences is not enough for XQA (query token s of sequence s): some may hold none
        self.one_token_each = metadata.is_decode

    def decode(self, layer_idx: int, out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int,
               sinks: torch.Tensor | None) -> None:  # fmt: skip
        """out [S, H, D] (written in place) of one query token per sequence, whose keys are in the cache already."""
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[3]
        k_cache, v_cache = kv_cache.unbind(1)  # [blocks, block_size, KV heads, D] each: views, strides read by XQA
        self.modules[layer_idx].xqa(
            False,  # the generic kernel: the Hopper FP8 kernel would round q and the probabilities to e4m3
            self.sm_count, num_kv_heads, max(0, sliding_window),
            scale * head_dim**0.5,  # XQA multiplies q.k by q_scale / sqrt(head_dim)
            out.unsqueeze(1), 1.0, q.contiguous().unsqueeze(1),  # [S, beam 1, H, D]: XQA reads q by its pointer
            sinks.float().contiguous().view(num_kv_heads, num_heads // num_kv_heads) if sinks is not None else None,
            k_cache, v_cache, None, None, block_table.contiguous(), block_table.shape[1] * self.block_size,
            seq_lens.contiguous().unsqueeze(1), num_seqs, 1.0, self.semaphores, self.scratch,
            self.pdl, 1, None, None,
        )  # fmt: skip


def _run(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
         layer_idx, scale, sliding_window, softcap, sinks) -> None:  # fmt: skip
    if not (decode_shaped(q.shape[0], seq_lens.shape[0]) and active_planner("xqa").one_token_each):  # triton's
        triton_paged_attention(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
                               layer_idx, scale, sliding_window, softcap, sinks)  # fmt: skip
        return
    write_kv_cache_fast(k, v, kv_cache, slot_mapping)
    if q.shape[0] == 0:  # a zero-sized grid is a launch error
        return
    # `out` is the op's own contiguous buffer (paged.py): XQA writes rows by their index from its pointer
    active_planner("xqa").decode(layer_idx, out, q, kv_cache, block_table, seq_lens, scale, sliding_window, sinks)


register_attention_backend(
    AttentionBackend(
        "xqa", _run, devices=("cuda",), unsupported=_unsupported, make_planner=XqaPlanner, cuda_graph_safe=True
    )
)
