"""The `triton` backend of `compiled_llm::moe_experts`: the token-expert pairs sorted by expert into blocks of
BLOCK_M rows (each block one expert's, padded), then two grouped GEMMs on tensor cores, one program per block and
column tile:

    gate_up: act[p] = act(x[p // k] @ w13[e]^T)          [S, I], S = T * k pairs, the activation in the epilogue
    down:    out[p] = (act[p] @ w2[e]^T) * weight[p]      [S, H], then summed over each token's k pairs

A block reads only its expert's weights, so a decode step reads the experts its tokens picked and no other; blocks
past the last used one return at once. One token (a decode step of one sequence) needs no sort: each pair is a
block of its own. The sort is torch ops with static shapes (no host sync): the whole op can
run inside a CUDA-graph capture.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

# The gated activations the kernel computes, by the op's name; the interleaved ones read [g0, u0, g1, u1, ...] rows.
ACTIVATIONS = {"silu": 0, "swiglu_oai": 1}
INTERLEAVED = {"swiglu_oai"}
DEFAULT_TILE = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
# One token: k blocks of one row each stream their experts' weights; narrower column tiles give the GPU more programs
# (Qwen3-30B-A3B's gate_up: 8 x 768/64 = 96 programs for 132 SMs at the default, 192 at 32). Not yet measured.
ONE_TOKEN_TILE = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
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
    many rows the used blocks hold. `blocks` is the most any routing needs, so shapes depend on T only."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    destination = (padded_end - padded)[sorted_experts] + rank
    blocks = max(1, min(pairs, -(-pairs // block_m) + num_experts))
    sorted_pairs = torch.full((blocks * block_m,), pairs, dtype=torch.int64, device=flat.device)
    sorted_pairs.scatter_(0, destination, order)
    block_starts = torch.arange(blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, block_expert, padded_end[-1:]


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_gemm_kernel(
        a_ptr, w_ptr, bias_ptr, out_ptr, route_w_ptr, sorted_pairs_ptr, block_expert_ptr, used_rows_ptr,
        a_scale_ptr, w_scale_ptr, round_ptr,
        pairs, N, top_k, stride_am, stride_we, stride_wn, stride_wk, up_offset, stride_be, stride_bn, bias_up_offset,
        stride_se, stride_sn, scale_up_offset, stride_om, alpha, limit,
        K: tl.constexpr, ONE_TOKEN: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
        A_PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ROUTE_WEIGHTS: tl.constexpr, FP8: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """out[p, n] for the rows p of one block: a[row(p)] @ w[e]^T over K (+ bias); GATED: w's rows n are the gate's,
        its rows n + up_offset (elements) the up's, act(gate, up) written; ROUTE_WEIGHTS: times the pair's routing
        weight. FP8: a and w in e4m3, the product times a's row scale and w's (expert, row) scale. Values round to
        round_ptr's dtype (the model's) where the reference's ops round."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if ONE_TOKEN:  # a block per pair, its first row; block_expert_ptr: the ids themselves
            rows = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, pairs).to(tl.int64)
        else:
            if pid_m * BLOCK_M >= tl.load(used_rows_ptr):
                return
            rows = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        valid = rows < pairs
        a_rows = rows // top_k if A_PER_TOKEN else rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
        w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K constexpr: the interpreter takes no runtime loop bound
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if FP8:  # e4m3 x e4m3 on tensor cores, float32 sums
                acc = tl.dot(a, w, acc)
            else:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            if GATED:
                w_up = tl.load(w_ptrs + up_offset, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if FP8:
                    acc_up = tl.dot(a, w_up, acc_up)
                else:
                    acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        if FP8:  # (sum * s_a) * s_w, as fp8_linear's reference
            a_scale = tl.load(a_scale_ptr + a_rows, mask=valid, other=0.0)[:, None]
            scale_ptrs = w_scale_ptr + expert * stride_se + cols * stride_sn
            acc = acc * a_scale * tl.load(scale_ptrs, mask=col_ok, other=0.0)[None, :]
            if GATED:
                acc_up = acc_up * a_scale * tl.load(scale_ptrs + scale_up_offset, mask=col_ok, other=0.0)[None, :]
        # Rounded to the model's dtype where the reference's ops round: the GEMM, the bias add, each activation op.
        dtype = round_ptr.dtype.element_ty
        out = acc.to(dtype).to(tl.float32)
        bias_ptrs = bias_ptr + expert * stride_be + cols * stride_bn
        if HAS_BIAS:
            out = (out + tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
        if GATED:
            up = acc_up.to(dtype).to(tl.float32)
            if HAS_BIAS:
                up_bias = tl.load(bias_ptrs + bias_up_offset, mask=col_ok, other=0.0).to(tl.float32)
                up = (up + up_bias[None, :]).to(dtype).to(tl.float32)
            if ACTIVATION == 0:  # silu(gate) * up
                out = (out * tl.sigmoid(out)).to(dtype).to(tl.float32) * up
            else:  # GPT-OSS: gate clamped above, up both ways; gate * sigmoid(alpha * gate) * (up + 1)
                gate = tl.minimum(out, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
                sig = tl.sigmoid((gate * alpha).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
                glu = (gate * sig).to(dtype).to(tl.float32)
                out = (up + 1.0).to(dtype).to(tl.float32) * glu
        out_dtype = out_ptr.dtype.element_ty
        if ROUTE_WEIGHTS:
            route_w = tl.load(route_w_ptr + rows, mask=valid, other=0.0)
            out = out.to(dtype).to(tl.float32) * route_w.to(tl.float32)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_dtype),
                 mask=valid[:, None] & col_ok[None, :])  # fmt: skip

    return grouped_gemm_kernel


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
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                 like: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """out[p] for every pair p of `blocks`: a[p // k if a_per_token else p] @ w[e]^T (+ bias[e]); gated: the
    activation (with its `params`) of w's gate and up rows; times route_weights[p] where given. `scales`: a and w are
    e4m3, with a's row scales [rows, 1] and w's [E, N]; `like`, a tensor of the model's dtype (a where not given).
    `tile` overrides the tuned or default one."""
    import triton

    n = w.shape[1] // 2 if gated else w.shape[1]
    tile = DEFAULT_TILE | (tile if tile is not None else tile_for(a, w, blocks.mode))
    a_scale, w_scale = scales if scales is not None else (a, w)
    bias_stride = bias.stride(1) if bias is not None else 0
    up_offset, bias_up_offset, scale_up_offset = n * w.stride(1), n * bias_stride, n * w_scale.stride(1)
    if gated and activation in INTERLEAVED:  # gate rows 0, 2, 4, ...; the up row after each
        up_offset, bias_up_offset, scale_up_offset = w.stride(1), bias_stride, w_scale.stride(1)
        w, bias = w[:, ::2], bias[:, ::2] if bias is not None else None
        w_scale = w_scale[:, ::2] if scales is not None else w
    alpha, limit = params if len(params) == 2 else (1.0, 0.0)
    grid = (blocks.block_expert.shape[0], triton.cdiv(n, tile["BLOCK_N"]))
    one_token = blocks.sorted_pairs is None
    ids = blocks.block_expert
    _kernels()[grid](
        a, w, bias if bias is not None else w, out, route_weights if route_weights is not None else a,
        ids if one_token else blocks.sorted_pairs, ids, ids if one_token else blocks.used_rows, a_scale, w_scale,
        like if like is not None else a, blocks.pairs, n, blocks.top_k, a.stride(0),
        w.stride(0), w.stride(1), w.stride(2), up_offset, bias.stride(0) if bias is not None else 0,
        bias.stride(1) if bias is not None else 0, bias_up_offset, w_scale.stride(0), w_scale.stride(1),
        scale_up_offset, out.stride(0), float(alpha), float(limit), K=w.shape[2], ONE_TOKEN=one_token, GATED=gated,
        ACTIVATION=ACTIVATIONS[activation], A_PER_TOKEN=a_per_token, HAS_BIAS=bias is not None,
        ROUTE_WEIGHTS=route_weights is not None, FP8=scales is not None, BLOCK_M=blocks.block_m,
        BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"], num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )  # fmt: skip
    return out


def sum_over_experts(weighted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weighted [T, k, H] summed over k, accumulated in float32 and rounded once to `dtype`: one kernel where the
    products are in `dtype` already (torch sums 16-bit values in float32), as a decode step wants."""
    if weighted.dtype == dtype:
        return weighted.sum(dim=1)
    return weighted.sum(dim=1, dtype=torch.float32).to(dtype)


def heuristic_tile(mode: int) -> dict:
    """What runs untuned in a row mode."""
    return ONE_TOKEN_TILE if mode == 1 else DEFAULT_TILE


def tile_for(a: torch.Tensor, w: torch.Tensor, mode: int) -> dict:
    fp8 = w.dtype == torch.float8_e4m3fn
    return TUNED_TILES.get((a.get_device(), w.shape[0], w.shape[1], w.shape[2], mode, fp8), heuristic_tile(mode))


def fused_moe(x, topk_ids, topk_weights, w13, w2, b13, b2, activation: str, params=(),
              weight_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """moe_experts over x [T, H] (unit last stride) in two grouped GEMMs; with `weight_scales` (w13's, w2's),
    moe_experts_fp8: w13 and w2 in e4m3, and x and the activation quantized per row before their GEMM."""
    from custom_ops.linear import fp8, triton_fp8

    tokens, hidden = x.shape
    if tokens * topk_ids.shape[1] == 0:
        return x.new_zeros(x.shape)
    blocks = expert_blocks(topk_ids, w13.shape[0])
    params = tuple(params)

    def gemm(a, w, bias, out, route_weights, weight_scale, **kwargs):
        if weight_scale is None:
            return grouped_gemm(a, w, bias, out, route_weights, blocks, **kwargs)
        quantize = triton_fp8.quantize_rows if a.is_cuda else lambda rows, _: fp8.quantize_rows(rows)  # bit-equal
        a8, a_scale = quantize(a, None)
        return grouped_gemm(a8, w, bias, out, route_weights, blocks, scales=(a_scale, weight_scale), like=x, **kwargs)

    w13_scale, w2_scale = weight_scales or (None, None)
    act = gemm(x, w13, b13, x.new_empty(blocks.pairs, w2.shape[2]), None, w13_scale, gated=True, a_per_token=True,
               activation=activation, params=params)  # fmt: skip
    weighted = x.new_empty(blocks.pairs, hidden, dtype=torch.promote_types(x.dtype, topk_weights.dtype))
    route_weights = topk_weights.reshape(-1).contiguous()  # the kernel reads it at unit stride
    gemm(act, w2, b2, weighted, route_weights, w2_scale, gated=False, a_per_token=False)
    return sum_over_experts(weighted.view(tokens, blocks.top_k, hidden), x.dtype)
