"""The `triton` paged-attention backend: one Triton kernel for mixed prefill/decode steps, no FlashInfer.

Each program computes BLOCK_Q query tokens of one sequence against one KV head, for all GROUP query heads
that read that KV head (so a GQA group shares every key/value load), with an online softmax over tiles
of keys gathered through the block table. Programs find their sequence by a binary search over
`query_start_loc`, so the launch grid depends only on tensor shapes: no planning, no host sync, and a
decode step replays in a CUDA graph as it is. A decode step (as many tokens as sequences) runs a program per
token instead: token s is sequence s's one token unless some sequence has none, so the search (a chain of
dependent loads) runs only then, and no program is left empty.

Sequence s owns program blocks starting at query_start_loc[s] // BLOCK_Q + s, which leaves room for its
ceil(query_len / BLOCK_Q) blocks; T // BLOCK_Q + S programs per KV head cover every sequence, and those
past a sequence's last query exit at once.

Decode steps have one query per sequence, too few programs to fill the GPU: there the keys of each
sequence are split over NUM_SPLITS programs (a number that depends on the batch size only, so graphs
stay valid), each writes its partial output and log-sum-exp, and a second kernel merges them. Those
steps' keys and values go into the cache from the attention kernel itself (WRITE_KV): each query tile's
first split stores its own tokens', and every program takes this step's keys from k and v rather than
the cache, so no program waits for another's write and the write costs no launch. Elsewhere a kernel
of its own writes them first: the extra loads in the key loop cost more than the launch once every
program walks many tiles (a batch of hundreds of sequences, a long prefill).

A decode launch with ONE_LAUNCH runs the step in the attention kernel alone: the program that finishes a row's splits
last merges them (MERGE_IN_KERNEL), and at one split the kernel writes the keys and values itself, so neither the
merge nor the write is a launch of its own. The untuned launch does so at 2 to ONE_LAUNCH_MAX_SPLITS splits; the
autotuner tries it everywhere else.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.attention.backends import (
    AttentionBackend,
    LayerAttentionFeatures,
    decode_shaped,
    register_attention_backend,
)
from custom_ops.attention.kv_cache_write import write_kv_cache_fast
from custom_ops.attention.paged import saturation_limit
from custom_ops.triton_runtime import KERNEL_DTYPES, pdl_launch_options, runs_ptx, triton_available

KEY_TILE = 32  # keys per inner-loop step; any block size works, each key looks its block up
# How a decode step's kernel launches (keys a loop step, and Triton's num_warps / num_stages where given): the
# benchmark sweeps these (benchmarks/attention_decode.py --triton-tiles); prefill and wide heads keep their own.
DECODE_LAUNCH: dict = {"TILE": KEY_TILE}
# An fp8 cache's decode steps pipeline 2 stages of keys, not Triton's default 3: on an H200, 32 keys x 2 stages beat
# 32 x 3 at every batch (1-512) and length (192, 2048 keys) timed but one (2% behind), by up to 35% at 64 rows and 2048
# keys (BENCHMARKS.md, "An fp8 KV cache read in float16 MMAs"). A DECODE_LAUNCH that names num_stages keeps its own.
FP8_CACHE_DECODE_STAGES = 2
MAX_SPLITS = 16
MAX_TILE_ELEMENTS = 64 * 256  # query rows x padded head_dim of a program's tile, at most (gemma2's prefill tile)
# Key splits the autotuner chose for decode steps (tuning.py), by split_key(); decode_splits() elsewhere.
TUNED_DECODE_SPLITS: dict[tuple, int] = {}
# Decode launches (DECODE_LAUNCH's form) the autotuner chose, by split_key(); default_decode_launch() elsewhere.
TUNED_DECODE_LAUNCHES: dict[tuple, dict] = {}
# The untuned decode launch merges its splits in the kernel (ONE_LAUNCH) at 2 to this many splits. Per layer on an H100
# (BENCHMARKS.md, "One launch a decode step"), it won at 9 splits (batch 4) and 3 (batch 16) over bf16 and fp8 caches,
# by 1.03-1.45x, and lost at 16 (batch 1: 1.10-1.34x slower, Qwen3-30B-A3B 0.94x end to end); at one split its KV
# write in the kernel lost over an fp8 cache (up to 1.9x slower at 64-256 rows) and tied over a bf16 one.
ONE_LAUNCH_MAX_SPLITS = 9
# The untuned decode launch runs one warp a program where a launch has this many programs an SM: p stays in registers
# (no shared-memory exchange between the two MMAs) and no row work is repeated by 4 warps (24 warp-instructions a key
# over an fp8 cache against 36; 42 against 57 when timed, before e4m3_to_float16 and the base-2 softmax;
# benchmarks/kernel_sass.py), but an SM needs other programs' warps to hide its loads.
# On an H100 (session 37, BENCHMARKS.md) at Llama-8B's layer, 192-2,048 keys: 1.26-1.33x at 256 and 512 rows (16 and
# 31 programs an SM) over an fp8 cache, 1.03-1.07x over a bf16 one; 0.77-0.82x at 64 rows (4 an SM) over an fp8 cache.
ONE_WARP_PROGRAMS_PER_SM = 8
# ... and where a program's tile (query rows x padded head_dim) is at most the timed one, 4 heads of 128 in 16 rows: one
# warp holds the whole float32 accumulator, 64 registers a thread there, 128 or more at head_dim 256 or in an MQA
# group's 64 rows (untimed; the tuner still times one warp there).
ONE_WARP_MAX_TILE = 16 * 128
# Programs of one decode launch (tokens x KV-head blocks) that can count their finished splits (ONE_LAUNCH); a larger
# launch merges in a second kernel. 64 KiB a layer's cache.
MERGE_COUNTERS = 1 << 14
_merge_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def merge_counters(kv_cache: torch.Tensor, needed: int) -> torch.Tensor | None:
    """The zeroed split counters of the layer whose cache is `kv_cache` (every launch leaves them zero), or None where
    `needed` do not fit or they do not exist yet while a CUDA graph is captured (made there, they would be zeroed by
    its replays only). A buffer a cache, never freed (a captured graph keeps its address): two models' steps may run
    at once on two streams, while one model's layers run one after another, each in its turn."""
    key = (kv_cache.device, kv_cache.data_ptr())
    counters = _merge_counters.get(key)
    if counters is None:
        if kv_cache.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _merge_counters[key] = torch.zeros(MERGE_COUNTERS, dtype=torch.int32, device=kv_cache.device)
    return counters if needed <= counters.numel() else None


def padded_head_dim(head_dim: int) -> int:
    """The head's width in the kernel's tiles: a power of 2, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def wide_head(head_dim: int) -> bool:
    """Whether a head runs the wide-head launch, whatever DECODE_LAUNCH or a tuned launch says. Its key and value
    tiles (latent attention's 576, padded to 1024) take fewer, shorter stages: the default's 3 stages of 32 keys need
    296 KB of shared memory, the H200 has 227 KB. Its [16, 1024] query, key and float32 output tiles would take over
    255 registers a thread of 4 warps: 8 warps hold them."""
    return padded_head_dim(head_dim) > 256


def default_decode_launch(cache_dtype: torch.dtype, splits: int | None = None, one_warp: bool = False) -> dict:
    """The untuned launch of a decode step of `splits` key splits over a cache of `cache_dtype`, every field named:
    DECODE_LAUNCH's, else Triton's own defaults (4 warps, 3 stages), one warp where `one_warp` (decode_one_warp),
    FP8_CACHE_DECODE_STAGES over an fp8 cache, and ONE_LAUNCH at 2 to ONE_LAUNCH_MAX_SPLITS splits."""
    warps = 1 if one_warp else 4
    stages = FP8_CACHE_DECODE_STAGES if cache_dtype.itemsize == 1 else 3
    one_launch = splits is not None and 1 < splits <= ONE_LAUNCH_MAX_SPLITS
    return {"num_warps": warps, "num_stages": stages, "ONE_LAUNCH": one_launch} | DECODE_LAUNCH


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 32


def decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device, head_blocks: int = 1) -> int:
    """Key splits per (sequence, KV head, block of its query heads) of a decode step: enough programs for two waves
    of the GPU."""
    return max(1, min(MAX_SPLITS, -(-2 * _multiprocessors(device) // (num_seqs * num_kv_heads * head_blocks))))


def decode_tile(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(query rows of a program's tile, programs a (sequence, KV head) takes for its query heads) of a decode step:
    tile_shape's."""
    group = num_heads // num_kv_heads
    block_m, _, group_block = tile_shape(num_seqs, num_seqs, group, head_dim)
    return block_m, -(-group // group_block)


def heuristic_decode_splits(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device) -> int:
    """decode_splits for a decode step of this layer shape, with its blocks of query heads."""
    return decode_splits(num_seqs, num_kv_heads, device, decode_tile(num_seqs, num_heads, num_kv_heads, head_dim)[1])


def decode_one_warp(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, splits: int,
                    device: torch.device) -> bool:  # fmt: skip
    """Whether a decode step's untuned launch runs one warp a program: ONE_WARP_PROGRAMS_PER_SM or more programs an SM
    of `device` (a program per sequence, KV head, block of its query heads and key split), each of a tile within
    ONE_WARP_MAX_TILE."""
    block_m, head_blocks = decode_tile(num_seqs, num_heads, num_kv_heads, head_dim)
    programs = num_seqs * num_kv_heads * head_blocks * splits
    fits = block_m * padded_head_dim(head_dim) <= ONE_WARP_MAX_TILE
    return fits and programs >= ONE_WARP_PROGRAMS_PER_SM * _multiprocessors(device)


def split_key(device_index: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
              sliding_window: int, cache_dtype: torch.dtype) -> tuple:  # fmt: skip
    return (device_index, num_seqs, num_heads, num_kv_heads, head_dim, sliding_window > 0, cache_dtype)


def _unsupported(features: LayerAttentionFeatures) -> str | None:
    if not triton_available():
        return "triton is not installed (pip install compiled-llm[gpu])"
    if features.dtype not in KERNEL_DTYPES:
        return f"dtype {features.dtype} (supports {', '.join(str(d) for d in KERNEL_DTYPES)})"
    if features.cache_dtype not in (features.dtype, torch.float8_e4m3fn):
        return f"KV cache dtype {features.cache_dtype}"
    return None


def tile_shape(num_tokens: int, num_seqs: int, group: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M rows per program, BLOCK_Q query tokens per program, GROUP_BLOCK query heads per program). tl.dot
    needs 16 rows at least; a decode step (as many tokens as sequences) takes the smallest tile, one token a
    program, prefill a taller one. The query heads of one KV head share a program (every key load), up to what a tile
    of this head_dim holds; more (latent attention's one KV head serves every query head) are split into blocks of
    one token."""
    import triton

    decode = decode_shaped(num_tokens, num_seqs)
    most_rows = max(16, MAX_TILE_ELEMENTS // padded_head_dim(head_dim))
    rows = min(16 if decode else 64, most_rows)
    group_block = min(group, most_rows)
    block_m = max(rows if group_block == group else 16, triton.next_power_of_2(group_block))
    return block_m, 1 if decode else block_m // group_block, group_block


def triton_paged_attention(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens,
                           layer_idx, scale, sliding_window, softcap, sinks, splits: int | None = None,
                           launch: dict | None = None) -> None:  # fmt: skip
    """The backend's run; `splits` and `launch` (decode steps only) override the tuned or heuristic key split count
    and launch."""
    import triton

    from custom_ops.attention.triton_kernel import merge_splits_kernel, paged_attention_kernel

    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    one_plane = kv_cache.shape[1] == 1  # values in the keys (paged.py): values read from the keys' plane
    v = k if one_plane else v if v.stride(-1) == 1 else v.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], kv_cache.shape[3]
    if num_tokens == 0:
        return
    group = num_heads // num_kv_heads
    block_m, block_q, group_block = tile_shape(num_tokens, num_seqs, group, head_dim)
    head_blocks = -(-group // group_block)
    # A decode step runs a program per token: token s is sequence s's one token unless some sequence has none (the
    # kernel searches only then), so no program is left empty
    decode = decode_shaped(num_tokens, num_seqs)
    if not decode:
        splits = 1
    else:
        key = split_key(q.get_device(), num_seqs, num_heads, num_kv_heads, head_dim, sliding_window, kv_cache.dtype)
        if splits is None:
            splits = TUNED_DECODE_SPLITS.get(key) or decode_splits(num_seqs, num_kv_heads, q.device, head_blocks)
        if launch is None:
            one_warp = decode_one_warp(num_tokens, num_heads, num_kv_heads, head_dim, splits, q.device)
            launch = TUNED_DECODE_LAUNCHES.get(key) or default_decode_launch(kv_cache.dtype, splits, one_warp)
    one_launch = decode and not wide_head(head_dim) and launch.get("ONE_LAUNCH", False)
    write_kv = splits > 1 or one_launch  # the kernel writes the cache itself (module docstring)
    if not write_kv:
        write_kv_cache_fast(k, v, kv_cache, slot_mapping)
    partial, lse = out, out  # one split: the kernel writes `out` itself
    if splits > 1:
        partial = torch.empty(splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    grid = (num_tokens if decode else num_tokens // block_q + num_seqs, num_kv_heads * head_blocks, splits)
    pdl = pdl_launch_options(q)
    head_dim_padded = padded_head_dim(head_dim)
    if wide_head(head_dim):
        key_tile, stages = 16, {"num_stages": 1, "num_warps": 8}
    elif decode:
        key_tile, stages = launch["TILE"], {k: v for k, v in launch.items() if k not in ("TILE", "ONE_LAUNCH")}
    else:
        key_tile, stages = KEY_TILE, {}
    counters = None
    in_ptx = runs_ptx(q)
    if splits > 1 and one_launch:
        counters = merge_counters(kv_cache, grid[0] * grid[1])
    paged_attention_kernel[grid](
        partial, lse, q, k, v, slot_mapping, kv_cache, block_table, query_start_loc, seq_lens,
        sinks if sinks is not None else q, scale, softcap, sliding_window, num_seqs, num_tokens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        partial.stride(-3), partial.stride(-2), partial.stride(0) if splits > 1 else 0,
        kv_cache.stride(0), 0 if one_plane else kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0), out, out.stride(0), out.stride(1), counters if counters is not None else seq_lens,
        GROUP=group, GROUP_BLOCK=group_block, BLOCK_Q=block_q, BLOCK_M=block_m, TILE=key_tile,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
        USE_SOFTCAP=softcap > 0, USE_WINDOW=sliding_window > 0, USE_SINKS=sinks is not None,
        IEEE_DOT=q.dtype == torch.float32, NUM_SPLITS=splits, WRITE_KV=write_kv,
        SATURATE_AT=saturation_limit(kv_cache.dtype), BLOCK_SIZE=kv_cache.shape[2], DECODE=decode,
        MERGE_IN_KERNEL=counters is not None, IN_PTX=in_ptx,
        # One warp only: with it the one-warp launch gained 1.09x at 512 rows, but 4 warps lost 4% at 64 rows (H100,
        # session 40, BENCHMARKS.md), where the converted tile's extra shared-memory round trip and 4-warp barrier
        # add to each step's latency (the 4-warp launch without it is untimed)
        VALUES_IN_PTX=in_ptx and stages.get("num_warps") == 1, **stages, **pdl,
    )  # fmt: skip
    if splits > 1 and counters is None:
        block_d = min(128, triton.next_power_of_2(head_dim))
        merge_splits_kernel[(num_tokens, num_heads, triton.cdiv(head_dim, block_d))](
            out, partial, lse, num_heads, out.stride(0), out.stride(1), partial.stride(0), partial.stride(1),
            partial.stride(2), NUM_SPLITS=splits, SPLITS_PADDED=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d, **pdl,
        )  # fmt: skip


register_attention_backend(
    AttentionBackend(
        "triton", triton_paged_attention, devices=("cuda",), unsupported=_unsupported, cuda_graph_safe=True
    )
)
