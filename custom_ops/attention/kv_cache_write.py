"""Writing a step's keys and values into the paged KV cache: one Triton kernel on CUDA.

The torch version (`paged.write_kv_cache`) takes four kernels per layer (two index
computations, two index_put); this one takes one launch for keys and values of every token.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.attention.paged import saturation_limit, write_kv_cache
from custom_ops.triton_runtime import pdl_launch_options, triton_runs_on


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def write_kv_kernel(
        k_ptr, v_ptr, cache_ptr, slot_ptr,
        k_token_stride, k_head_stride, v_token_stride, v_head_stride,
        cache_block_stride, cache_kv_stride, cache_page_stride, cache_head_stride,
        block_size, HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr, BLOCK: tl.constexpr,
        SATURATE_AT: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token)
        block, offset = slot // block_size, slot % block_size
        cols = tl.arange(0, BLOCK)
        mask = cols < NUM_HEADS * HEAD_DIM
        head, dim = cols // HEAD_DIM, cols % HEAD_DIM
        k = tl.load(k_ptr + token * k_token_stride + head * k_head_stride + dim, mask=mask)
        v = tl.load(v_ptr + token * v_token_stride + head * v_head_stride + dim, mask=mask)
        if SATURATE_AT > 0:  # fp8 cache: clamp rather than overflow
            k = tl.clamp(k.to(tl.float32), -SATURATE_AT, SATURATE_AT)
            v = tl.clamp(v.to(tl.float32), -SATURATE_AT, SATURATE_AT)
        dst = cache_ptr + block * cache_block_stride + offset * cache_page_stride + head * cache_head_stride + dim
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + cache_kv_stride, v.to(cache_ptr.dtype.element_ty), mask=mask)

    return write_kv_kernel


def write_kv_cache_fast(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Same effect as `write_kv_cache`; one Triton launch where the tensors allow it."""
    one_plane = kv_cache.shape[1] == 1  # values in the keys (paged.py): k stored once (both stores land there)
    v = k if one_plane else v
    num_tokens, num_heads, head_dim = k.shape
    last_dims_contiguous = k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if not (last_dims_contiguous and triton_runs_on(k)):
        write_kv_cache(k, v, kv_cache, slot_mapping)
        return
    if num_tokens == 0:
        return
    import triton

    _kernel()[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), 0 if one_plane else kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[2], HEAD_DIM=head_dim, NUM_HEADS=num_heads,
        BLOCK=triton.next_power_of_2(num_heads * head_dim),
        SATURATE_AT=saturation_limit(kv_cache.dtype),
        **pdl_launch_options(k),
    )  # fmt: skip
