"""The `triton` backend of `compiled_llm::moe_experts`: the token-expert pairs sorted by expert into blocks of
BLOCK_M rows (each block one expert's, padded), then two grouped GEMMs on tensor cores, one program per block and
column tile (one token of float experts: the GEMV without tensor cores by default, one_token_gemv_kernel):

    gate_up: act[p] = act(x[p // k] @ w13[e]^T)          [S, I], S = T * k pairs, the activation in the epilogue
    down:    out[p] = (act[p] @ w2[e]^T) * weight[p]      [S, H], then summed over each token's k pairs

A block reads only its expert's weights, so a decode step reads the experts its tokens picked and no other; blocks
past the last used one return at once. One token (a decode step of one sequence) needs no sort: each pair is a
block of its own. The sort is torch ops with static shapes (no host sync): the whole op can
run inside a CUDA-graph capture. The sum over a token's pairs is a small kernel after the down GEMM, or for one token
under a "sum" tile the down GEMM's own epilogue (down_projection).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from custom_ops.triton_runtime import KERNEL_DTYPES, pdl_launch_options, triton_runs_on

# The gated activations the kernel computes, by the op's name; the interleaved ones read [g0, u0, g1, u1, ...] rows.
ACTIVATIONS = {"silu": 0, "swiglu_oai": 1}
INTERLEAVED = {"swiglu_oai"}
DEFAULT_TILE = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
# One token of e4m3 experts (and of float ones the GEMV below does not take): k blocks of one row each stream their
# experts' weights; narrower column tiles give the GPU more programs (Qwen3-30B-A3B's gate_up: 8 x 768/64 = 96
# programs for 132 SMs at the default, 192 at 32).
ONE_TOKEN_TILE = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
# One token of float (16-bit) experts: the GEMV without tensor cores in the dense GEMV's form, whole rows of 1,024
# columns, 2 a program, all of a program's loads in flight at once; its down GEMM summed over the token's pairs in the
# same kernel (no sum kernel after it). On an H100 at Qwen3-30B-A3B's shapes (session 37, BENCHMARKS.md): gate/up
# 23.2 us against 24.4 at ONE_TOKEN_TILE, down 13.2 us against 15.2 plus the sum's kernel; 1.075x end to end.
FLOAT_ONE_TOKEN_TILE = {"gemv": True, "BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1}
FLOAT_ONE_TOKEN_DOWN_TILE = {"sum": True, "gemv": True, "BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1}
# Their K loop is unrolled (one stage: each step's loads in flight together) up to this many steps; a longer K
# (Mixtral's down: 14,336) would loop unpipelined, each step waiting out its load, so it keeps ONE_TOKEN_TILE. So do
# more pairs than the 8 timed in one summing program (its accumulator holds every pair's tile).
GEMV_UNROLLED_STEPS = 4
SUM_GEMV_MAX_PAIRS = 8
# One token of MXFP4 weights: the GEMV without tensor cores (one_token_gemv_kernel), whose decode costs fewer
# instructions a weight than the tensor-core operand's; on an H200 at GPT-OSS-20B's shapes 1.3x the fastest tile
# (benchmarks/moe_gemm_tiles.py, BENCHMARKS.md).
# Its K loop pipelined 3 deep (cp.async, tl.range's num_stages): on an H100 at GPT-OSS-20B's gate/up 27.9 us against
# 32.0 unpipelined (session 27, BENCHMARKS.md); the latency-bound loop's gain.
MXFP4_ONE_TOKEN_TILE = {"gemv": True, "BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}
# The down GEMM's (no gate/up pair a program: half the loads a step): 512 columns a step, unpipelined, 18.1 us against
# 19.7 at the tile above on the same H100 run (GPT-OSS-20B's [32, 2880, 2880]).
MXFP4_ONE_TOKEN_DOWN_TILE = MXFP4_ONE_TOKEN_TILE | {"BLOCK_K": 512, "num_stages": 1}
# Rows of MXFP4 experts in blocks: Triton's own upcast (tl.dot_scaled, bf16 rows) on wider K steps, 1.1-1.4x the
# kernel's decode at 16 rows an expert there.
MXFP4_TILE = DEFAULT_TILE | {"BLOCK_K": 128, "dot_scaled": True}
# (device index, num_experts, n, k, row mode, e4m3 weights) -> a tile the autotuner chose (tuning.py), read at every
# call; the row mode is 1 for one token (a block per pair), else BLOCK_M.
TUNED_TILES: dict[tuple, dict] = {}


def block_m_for(pairs: int, num_experts: int) -> int:
    """Rows per block: the expected pairs an expert gets, as a power of two in [16, 64] (tl.dot's smallest M is 16;
    a decode step's experts get one row each)."""
    per_expert = -(-pairs // num_experts)
    return min(64, max(16, 1 << max(0, per_expert - 1).bit_length()))


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_pairs [blocks * block_m], block_expert [blocks], used_rows [1]): pair indices t * k + j grouped by
    expert, each expert's run padded to a multiple of block_m with the sentinel S; the expert of each block; how
    many rows the used blocks hold. `blocks` is the most any routing needs, so shapes depend on T only. Pairs of an
    id outside [0, num_experts) (another rank's expert) come last, in blocks whose expert is num_experts: the
    kernels write zeros for them."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    bins = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # [pairs]: bin num_experts, no expert's
    pairs = flat.numel()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, bins, torch.ones_like(bins)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(bins, stable=True)
    sorted_experts = bins[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    destination = (padded_end - padded)[sorted_experts] + rank
    # A bin of c pairs takes ceil(c / block_m) < c / block_m + 1 blocks: over num_experts + 1 bins, fewer than
    # pairs / block_m + num_experts + 1, so at most ceil(pairs / block_m) + num_experts (and one a pair at most).
    blocks = max(1, min(pairs, -(-pairs // block_m) + num_experts))
    sorted_pairs = torch.full((blocks * block_m,), pairs, dtype=torch.int64, device=flat.device)
    sorted_pairs.scatter_(0, destination, order)
    block_starts = torch.arange(blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts)
    return sorted_pairs, block_expert, padded_end[-1:]


def _kernels():
    from custom_ops.moe import triton_moe_kernels  # needs triton: imported on first use

    return triton_moe_kernels


def _one_token_kernels():
    from custom_ops.moe import triton_one_token_kernels  # needs triton: imported on first use

    return triton_one_token_kernels


class ExpertBlocks(NamedTuple):
    """Which rows each program of a grouped GEMM computes: `sort_by_expert`'s blocks, or for one token (sorted_pairs
    None) a block per pair, whose expert is `block_expert` (the ids themselves)."""

    sorted_pairs: torch.Tensor | None
    block_expert: torch.Tensor
    used_rows: torch.Tensor | None
    pairs: int
    top_k: int
    block_m: int

    @property
    def mode(self) -> int:
        """The tuning table's row mode: 1 for one token, else BLOCK_M."""
        return 1 if self.sorted_pairs is None else self.block_m


def expert_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int | None = None) -> ExpertBlocks:
    tokens, top_k = topk_ids.shape
    pairs = tokens * top_k
    block_m = block_m or block_m_for(pairs, num_experts)
    if tokens == 1:  # a decode step of one sequence: no sort, a block per pair
        return ExpertBlocks(None, topk_ids.reshape(-1).contiguous(), None, pairs, top_k, block_m)  # read at unit stride
    return ExpertBlocks(*sort_by_expert(topk_ids, num_experts, block_m), pairs, top_k, block_m)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 route_weights: torch.Tensor | None, blocks: ExpertBlocks, *, gated: bool, a_per_token: bool,
                 activation: str = "silu", params: tuple[float, ...] = (), tile: dict | None = None,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None, mxfp4_scales: torch.Tensor | None = None,
                 like: torch.Tensor | None = None, sum_pairs: bool = False) -> torch.Tensor:  # fmt: skip
    """out[p] for every pair p of `blocks`: a[p // k if a_per_token else p] @ w[e]^T (+ bias[e]); gated: the
    activation (with its `params`) of w's gate and up rows; times route_weights[p] where given. `scales`: a and w are
    e4m3, with a's row scales [rows, 1] and w's [E, N]; `mxfp4_scales`: w is MXFP4 bytes [E, N, K / 2] with these
    exponents [E, N, K / 32] (mxfp4.py); `like`, a tensor of the model's dtype (a where not given). `tile` overrides
    the tuned or default one; its "dot_scaled" (MXFP4, bf16 rows) dequantizes through tl.dot_scaled instead of the
    kernel's own decode; its "gemv" (one token) runs one_token_gemv_kernel, without tensor cores. `sum_pairs` (one
    token's down GEMM): out [1, N] is instead the sum of its k weighted rows, in float32 rounded once to the model's
    dtype, from one kernel (a program per column tile, looping over the pairs; the GEMV's under a "gemv" tile)."""
    import triton

    one_token = blocks.sorted_pairs is None
    if sum_pairs and not (one_token and route_weights is not None and not gated and not a_per_token):
        raise ValueError("sum_pairs sums one token's weighted down-GEMM rows: it takes one token, a row of a pair and "
                         "routing weights, not a gated GEMM")  # fmt: skip
    mxfp4 = mxfp4_scales is not None
    n = w.shape[1] // 2 if gated else w.shape[1]
    tile = DEFAULT_TILE | (tile if tile is not None else tile_for(a, w, blocks.mode, mxfp4, gated, blocks.top_k))
    if mxfp4 and tile["BLOCK_K"] % 32:
        raise ValueError(f"MXFP4 weights take column tiles of whole 32-column groups, not BLOCK_K={tile['BLOCK_K']}")
    if one_token and mxfp4 and tile.get("mma") and not sum_pairs:
        from custom_ops.moe import gluon_mxfp4

        if gluon_mxfp4.launch_for(a, w, mxfp4_scales, **tile) is not None:
            return _one_token_mma(a, w, bias, out, route_weights, blocks, mxfp4_scales, gated, a_per_token,
                                  activation, params, tile, like if like is not None else a)  # fmt: skip
        tile = DEFAULT_TILE | heuristic_tile(1, "mxfp4", gated)  # where the kernel does not run (CPU, other dtypes)
    a_scale, w_scale = scales if scales is not None else (a, mxfp4_scales if mxfp4 else w)
    bias_stride = bias.stride(1) if bias is not None else 0
    up_offset, bias_up_offset, scale_up_offset = n * w.stride(1), n * bias_stride, n * w_scale.stride(1)
    if gated and activation in INTERLEAVED:  # gate rows 0, 2, 4, ...; the up row after each
        up_offset, bias_up_offset, scale_up_offset = w.stride(1), bias_stride, w_scale.stride(1)
        w, bias = w[:, ::2], bias[:, ::2] if bias is not None else None
        w_scale = w_scale[:, ::2] if scales is not None or mxfp4 else w
    alpha, limit = params if len(params) == 2 else (1.0, 0.0)
    ids = blocks.block_expert
    grid = (1 if sum_pairs else ids.shape[0], triton.cdiv(n, tile["BLOCK_N"]))
    common = (
        blocks.pairs, n, blocks.top_k, a.stride(0), w.stride(0), w.stride(1), w.stride(2), up_offset,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0, bias_up_offset,
        w_scale.stride(0), w_scale.stride(1), w_scale.stride(2) if mxfp4 else 0, scale_up_offset, out.stride(0),
        float(alpha), float(limit), w.shape[0],
    )  # fmt: skip
    flags = {
        "K": w.shape[2] * (2 if mxfp4 else 1), "GATED": gated, "ACTIVATION": ACTIVATIONS[activation],
        "A_PER_TOKEN": a_per_token, "HAS_BIAS": bias is not None, "ROUTE_WEIGHTS": route_weights is not None,
        "FP8": scales is not None, "MXFP4": mxfp4, "BLOCK_N": tile["BLOCK_N"], "BLOCK_K": tile["BLOCK_K"],
        "num_warps": tile["num_warps"], "num_stages": tile["num_stages"],
    }  # fmt: skip
    tensors = (a, w, bias if bias is not None else w, out, route_weights if route_weights is not None else a)
    like = like if like is not None else a
    if one_token and tile.get("gemv") and (not mxfp4 or reads_as_words(w, up_offset)):
        _one_token_kernels().one_token_gemv_kernel[grid](*tensors, ids, a_scale, w_scale, like, *common[1:],
                                               STAGES=tile["num_stages"], SUM_PAIRS=blocks.top_k if sum_pairs else 0,
                                               PAIRS_PADDED=triton.next_power_of_2(blocks.top_k), **flags,
                                               **pdl_launch_options(a))  # fmt: skip
        return out
    _kernels().grouped_gemm_kernel[grid](
        *tensors, ids if one_token else blocks.sorted_pairs, ids, ids if one_token else blocks.used_rows, a_scale,
        w_scale, like, *common, ONE_TOKEN=one_token, SUM_PAIRS=blocks.top_k if sum_pairs else 0,
        BLOCK_M=max(blocks.block_m, triton.next_power_of_2(blocks.top_k)) if sum_pairs else blocks.block_m,
        DOT_SCALED=mxfp4 and tile.get("dot_scaled", False) and a.dtype == torch.bfloat16 and a.is_cuda, **flags,
        **pdl_launch_options(a),
    )  # fmt: skip
    return out


def _one_token_mma(a, w, bias, out, route_weights, blocks: ExpertBlocks, exponents, gated: bool, a_per_token: bool,
                   activation: str, params: tuple, tile: dict, like: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """grouped_gemm's one-token MXFP4 call on tensor cores (gluon_mxfp4: every row of each pair's expert as float32
    sums), then one_token_gemv_kernel's epilogue over them (one_token_epilogue_kernel)."""
    import triton

    from custom_ops.moe import gluon_mxfp4

    ids = blocks.block_expert
    raw = gluon_mxfp4.experts_mma(a, w, exponents, ids, blocks.top_k, a_per_token, **tile)
    n = w.shape[1] // 2 if gated else w.shape[1]
    raw_col, raw_up = (2, 1) if gated and activation in INTERLEAVED else (1, n)  # where output column c's sums are
    alpha, limit = params if len(params) == 2 else (1.0, 0.0)
    block_n = min(256, triton.next_power_of_2(n))
    _one_token_kernels().one_token_epilogue_kernel[(blocks.pairs, triton.cdiv(n, block_n))](
        raw, bias if bias is not None else raw, out, route_weights if route_weights is not None else raw, ids, like, n,
        raw.stride(0), raw_col, raw_up, bias.stride(0) if bias is not None else 0,
        bias.stride(1) if bias is not None else 0, out.stride(0), float(alpha), float(limit), w.shape[0],
        GATED=gated, ACTIVATION=ACTIVATIONS[activation], HAS_BIAS=bias is not None,
        ROUTE_WEIGHTS=route_weights is not None, BLOCK_N=block_n, **pdl_launch_options(raw),
    )  # fmt: skip
    return out


def reads_as_words(w: torch.Tensor, up_offset: int) -> bool:
    """Whether the GEMV can read MXFP4 bytes w [E, N, K / 2] as int32 words (mxfp4_row_dot): 4-byte aligned rows of
    unit stride. A checkpoint's own tensors are; a view that is not takes the tensor-core kernel, which reads bytes."""
    return w.stride(2) == 1 and w.data_ptr() % 4 == 0 and all(s % 4 == 0 for s in (w.stride(0), w.stride(1), up_offset))


def down_projection(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, route_weights: torch.Tensor,
                    blocks: ExpertBlocks, *, tile: dict | None = None,
                    scales: tuple[torch.Tensor, torch.Tensor] | None = None, mxfp4_scales: torch.Tensor | None = None,
                    like: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The down GEMM (grouped_gemm's arguments) summed over each token's k pairs: [T, N] in the model's dtype, the
    sum in float32 rounded once. One token under a tile with "sum" (the tuned or given one): that one kernel
    (sum_pairs); else the weighted rows [T * k, N] in the promoted dtype of the model's and the routing weights',
    then sum_over_experts."""
    like = like if like is not None else a
    tile = tile if tile is not None else tile_for(a, w, blocks.mode, mxfp4_scales is not None, False, blocks.top_k)
    gemm = functools.partial(grouped_gemm, a, w, bias, route_weights=route_weights, blocks=blocks, gated=False,
                             a_per_token=False, tile=tile, scales=scales, mxfp4_scales=mxfp4_scales,
                             like=like)  # fmt: skip
    n = w.shape[1]
    if blocks.mode == 1 and tile.get("sum"):
        return gemm(out=like.new_empty(1, n), sum_pairs=True)
    weighted = gemm(out=like.new_empty(blocks.pairs, n, dtype=torch.promote_types(like.dtype, route_weights.dtype)))
    return sum_over_experts(weighted.view(-1, blocks.top_k, n), like.dtype)


def sum_over_experts(weighted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weighted [T, k, H] summed over k, accumulated in float32 and rounded once to `dtype`: sum_pairs_kernel where
    Triton runs (torch's reduction kernel took 4.7 us a decode step's layer on an H200), else torch's (which sums
    16-bit values in float32)."""
    if triton_runs_on(weighted) and {weighted.dtype, dtype} <= set(KERNEL_DTYPES) and weighted.is_contiguous():
        import triton

        tokens, top_k, n = weighted.shape
        out = weighted.new_empty(tokens, n, dtype=dtype)
        pairs_padded = triton.next_power_of_2(top_k)
        block_n = min(triton.next_power_of_2(n), max(16, 4096 // pairs_padded))  # 4096 values a program at most
        _kernels().sum_pairs_kernel[(tokens, triton.cdiv(n, block_n))](
            weighted, out, n, TOP_K=top_k, PAIRS_PADDED=pairs_padded, BLOCK_N=block_n, **pdl_launch_options(weighted)
        )
        return out
    if weighted.dtype == dtype:
        return weighted.sum(dim=1)
    return weighted.sum(dim=1, dtype=torch.float32).to(dtype)


def heuristic_tile(mode: int, fmt: str = "float", gated: bool = True, k_contiguous: bool = True, k: int = 0,
                   top_k: int = 1) -> dict:  # fmt: skip
    """What runs untuned in a row mode, for weights stored as `fmt` (weight_format), of the gate/up GEMM or (not
    `gated`) the down one, over K = `k` columns for `top_k` pairs a token; `k_contiguous`: a weight row's K values
    adjacent in memory (not GPT-OSS's transposed storage, where the GEMV's loads along K would each gather a column:
    tensor-core tiles load along N there)."""
    if fmt == "mxfp4":
        return (MXFP4_ONE_TOKEN_TILE if gated else MXFP4_ONE_TOKEN_DOWN_TILE) if mode == 1 else MXFP4_TILE
    if fmt == "float" and mode == 1 and k_contiguous:
        gemv = FLOAT_ONE_TOKEN_TILE if gated else FLOAT_ONE_TOKEN_DOWN_TILE
        if k <= GEMV_UNROLLED_STEPS * gemv["BLOCK_K"] and (gated or top_k <= SUM_GEMV_MAX_PAIRS):
            return gemv
    return ONE_TOKEN_TILE if mode == 1 else DEFAULT_TILE


def weight_format(w: torch.Tensor, mxfp4: bool = False) -> str:
    """The tuning table's name for how a grouped GEMM's weights are stored."""
    return "mxfp4" if mxfp4 else "fp8" if w.dtype == torch.float8_e4m3fn else "float"


def tile_for(a: torch.Tensor, w: torch.Tensor, mode: int, mxfp4: bool = False, gated: bool = True,
             top_k: int = 1) -> dict:  # fmt: skip
    k = w.shape[2] * (2 if mxfp4 else 1)
    fmt = weight_format(w, mxfp4)
    tuned = TUNED_TILES.get((a.get_device(), w.shape[0], w.shape[1], k, mode, fmt))
    return tuned if tuned is not None else heuristic_tile(mode, fmt, gated, w.stride(2) == 1, k, top_k)


def fused_moe(x, topk_ids, topk_weights, w13, w2, b13, b2, activation: str, params=(),
              weight_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
              mxfp4_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """moe_experts over x [T, H] (unit last stride) in two grouped GEMMs; with `weight_scales` (w13's, w2's),
    moe_experts_fp8: w13 and w2 in e4m3, and x and the activation quantized per row before their GEMM; with
    `mxfp4_scales`, moe_experts_mxfp4: w13 and w2 MXFP4 bytes, dequantized in the kernel."""
    from custom_ops.linear import fp8, triton_w8a8

    if topk_ids.numel() == 0:
        return x.new_zeros(x.shape)
    blocks = expert_blocks(topk_ids, w13.shape[0])

    def gemm_inputs(a, weight_scale, exponents) -> tuple[torch.Tensor, dict]:
        """A GEMM's rows and its format's arguments: FP8 quantizes the rows."""
        if weight_scale is None:
            return a, {"mxfp4_scales": exponents}
        quantize = triton_w8a8.quantize_rows if a.is_cuda else lambda rows, _: fp8.quantize_rows(rows)  # bit-equal
        a8, a_scale = quantize(a, None)
        return a8, {"scales": (a_scale, weight_scale), "like": x}

    w13_scale, w2_scale = weight_scales or (None, None)
    w13_exponents, w2_exponents = mxfp4_scales or (None, None)
    intermediate = w2.shape[2] * (2 if mxfp4_scales else 1)
    a, kwargs = gemm_inputs(x, w13_scale, w13_exponents)
    act = grouped_gemm(a, w13, b13, x.new_empty(blocks.pairs, intermediate), None, blocks, gated=True,
                       a_per_token=True, activation=activation, params=tuple(params), **kwargs)  # fmt: skip
    route_weights = topk_weights.reshape(-1).contiguous()  # the kernel reads it at unit stride
    a, kwargs = gemm_inputs(act, w2_scale, w2_exponents)
    return down_projection(a, w2, b2, route_weights, blocks, **kwargs)
