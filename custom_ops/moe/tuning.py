"""The MoE grouped GEMMs' candidates for the autotuner (autotune.tuner.OpTuning): a tile per expert weight shape
[E, N, K] (gate_up's, with its activation, and down's) and row mode, for the graph's `compiled_llm::moe_experts`
calls whose backend is `triton`.

Row modes: 1 (one token: a block per pair, a batch-1 decode step) and the block heights 16, 32 and 64 (what a step
with that many pairs an expert runs, triton_moe.block_m_for). A down candidate is timed and checked with the sum over
each token's k pairs that it needs (triton_moe.down_projection): one token's "sum" tiles sum inside the GEMM, the
others run the sum kernel after it. The fallback is triton_moe.DEFAULT_TILE; untuned, a call runs
triton_moe.heuristic_tile's; a winner is installed in triton_moe.TUNED_TILES, which every later call of that
shape on that device reads, CUDA-graph captures included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from autotune.kernel_cache import source_hash
from autotune.select import device_index, graph_value, register
from autotune.tuner import Candidate, input_copies
from custom_ops.linear.fp8 import quantize_rows
from custom_ops.moe import fp8, mxfp4, op, triton_moe

OP = "moe_grouped_gemm"
ROW_MODES = (1, 16, 32, 64)
TILES = (
    triton_moe.DEFAULT_TILE,  # the fallback: first
    triton_moe.ONE_TOKEN_TILE,  # a heuristic for one token (heuristic_tile): more programs for a batch-1 step's experts
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_stages": 4},
    {"BLOCK_N": 64, "BLOCK_K": 128},
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_K": 64},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8},
    {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8},
)
# One token: one_token_gemv_kernel's tiles (no tensor cores), beside the tiles above; num_stages is how far its K loop
# pipelines its loads (1: not at all, each step waits out a load; the leaders of session 25 also at 2 and 3). The last
# four are the dense GEMV's form (triton_gemv.gemv_config): a few rows a program, whole rows of up to 2,048 columns in
# one load, so each program's weights are all in flight at once (on Llama-8B's linears 5-50% faster than steps of
# 512-1,024 columns). Two of them are float experts' defaults now (triton_moe.FLOAT_ONE_TOKEN_TILE, ..._DOWN_TILE):
# on an H100 at Qwen3-30B-A3B's shapes ahead of the tensor-core tiles (BENCHMARKS.md, session 37).
GEMV_TILES = tuple(
    {"gemv": True, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
    for n, k, w, s in ((8, 512, 4, 1), (16, 256, 4, 1), (16, 512, 4, 1), (32, 256, 4, 1), (16, 1024, 8, 1),
                       (32, 512, 8, 1), (16, 256, 4, 2), (16, 256, 4, 3), (16, 512, 4, 2), (16, 512, 4, 3),
                       (1, 2048, 4, 1), (2, 2048, 4, 1), (2, 1024, 4, 1), (4, 1024, 4, 1))
)  # fmt: skip
# One token of MXFP4 weights on tensor cores (gluon_mxfp4: a program's SPLIT warps each a slice of K, UNROLL steps of
# 32 columns a loop iteration), the epilogue after it; not yet timed on a GPU.
MMA_TILES = tuple({"mma": True, "SPLIT": s, "UNROLL": u} for s, u in ((2, 5), (2, 3), (1, 5), (1, 9)))
# One token's down GEMM summed over its k pairs in the kernel (triton_moe.down_projection), no sum kernel after it: a
# program per column tile of the one output row, so narrow tiles for enough programs (Qwen3-30B-A3B: 2048 / 16 = 128
# on 132 SMs), and deep pipelines to keep a program's weight loads in flight across its k experts.
# The GEMV's form sums them too (one_token_gemv_kernel's SUM_PAIRS): a few rows a program, each pair's row in one or
# a few unrolled loads, all the pairs' loads in flight together (float and e4m3 experts; MXFP4's, a pair at a time).
SUM_TILES = tuple(
    {"sum": True, "BLOCK_N": n, "BLOCK_K": k, "num_warps": 4, "num_stages": s}
    for n, k, s in ((16, 128, 4), (16, 128, 6), (16, 256, 4), (16, 256, 5), (32, 128, 4), (32, 256, 4))
) + tuple(
    {"sum": True, "gemv": True, "BLOCK_N": n, "BLOCK_K": k, "num_warps": 4, "num_stages": 1}
    for n, k in ((1, 1024), (2, 1024), (2, 512), (4, 512))
)
# The launchers and their kernels (and the MMA tiles' decode): any change in them is a changed candidate.
_HERE = Path(triton_moe.__file__).parent
_SOURCE = source_hash("".join(path.read_text() for path in (
    *(_HERE / name for name in ("triton_moe.py", "triton_moe_kernels.py", "triton_one_token_kernels.py", "gluon_mxfp4.py", "gluon_mxfp4_kernels.py")),
    *(_HERE.parent / "linear" / name for name in ("gluon_int4_kernels.py", "gluon_int4_decode.py")),
)))  # fmt: skip


def tile_name(tile: dict) -> str:
    if tile.get("mma"):
        return f"mma-s{tile['SPLIT']}-u{tile['UNROLL']}"
    tile = triton_moe.DEFAULT_TILE | tile
    name = f"n{tile['BLOCK_N']}-k{tile['BLOCK_K']}-s{tile['num_stages']}-w{tile['num_warps']}"
    name = "sum-" + name if tile.get("sum") else name
    return "gemv-" + name if tile.get("gemv") else name + "-dot_scaled" if tile.get("dot_scaled") else name


def _run(a, w, route_weights, blocks: triton_moe.ExpertBlocks, scales, like, exponents, gated: bool,
         tile: dict) -> torch.Tensor:  # fmt: skip
    """gate_up's activations [pairs, N / 2], or down's rows summed over each token's pairs [T, N]."""
    if not gated:
        return triton_moe.down_projection(a, w, None, route_weights, blocks, tile=tile, scales=scales,
                                          mxfp4_scales=exponents, like=like)  # fmt: skip
    out = a.new_empty(blocks.pairs, w.shape[1] // 2, dtype=(like if like is not None else a).dtype)
    return triton_moe.grouped_gemm(a, w, None, out, None, blocks, gated=True, a_per_token=True, tile=tile,
                                   scales=scales, mxfp4_scales=exponents, like=like)  # fmt: skip


def tokens_for(mode: int, experts: int, top_k: int) -> int:
    """A step's token count whose pairs run in `mode`: as many pairs an expert, on average, as the block holds."""
    return 1 if mode == 1 else max(2, mode * experts // top_k)


class MoeGroupedGemmTuning:
    """autotune.tuner.OpTuning of triton_moe.grouped_gemm; bucket {"experts", "n", "k", "gated", "fp8", "top_k",
    "rows"} and "mxfp4", "transposed" where true: w [experts, n, k] (gated: n = 2I, [gate; up] rows; fp8: e4m3 rows
    and weights, moe_experts_fp8's; mxfp4: MXFP4 weights, moe_experts_mxfp4's; transposed: stored [experts, k, n], as
    GPT-OSS's are, timed so), `rows` the row mode."""

    op = OP

    def candidates(self, bucket: dict) -> list[Candidate]:
        tiles = [triton_moe.DEFAULT_TILE | tile for tile in TILES]
        if bucket.get("mxfp4"):  # Triton's own upcast beside the kernel's decode, each tile
            tiles += [tile | {"dot_scaled": True} for tile in tiles]
        if bucket["rows"] == 1:
            # The GEMV's tiles load along K: over transposed storage each load would gather a column
            along_k = not bucket.get("transposed")
            tiles += [triton_moe.DEFAULT_TILE | tile for tile in GEMV_TILES if along_k]
            if bucket.get("mxfp4"):
                tiles += [triton_moe.DEFAULT_TILE | tile for tile in MMA_TILES]
            if not bucket["gated"]:
                tiles += [triton_moe.DEFAULT_TILE | tile for tile in SUM_TILES if along_k or not tile.get("gemv")]
        return [
            Candidate(tile_name(t), functools.partial(_run, gated=bucket["gated"], tile=t), _SOURCE, t) for t in tiles
        ]

    def heuristic(self, bucket: dict) -> str:
        rows, fmt, gated, k_contiguous = bucket["rows"], _format(bucket), bucket["gated"], not bucket.get("transposed")
        return tile_name(triton_moe.heuristic_tile(rows, fmt, gated, k_contiguous, bucket["k"], bucket["top_k"]))

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        experts, n, k, top_k, gated = bucket["experts"], bucket["n"], bucket["k"], bucket["top_k"], bucket["gated"]
        top_k = min(top_k, experts)  # a rank's experts under expert parallelism may be fewer than the router's k
        tokens = tokens_for(bucket["rows"], experts, top_k)
        device = torch.device("cuda", torch.cuda.current_device())
        sets = []
        for _ in range(input_copies(experts * n * k * dtype.itemsize)):
            ids = torch.rand(tokens, experts, device=device).topk(top_k).indices  # uniform routing
            blocks = triton_moe.expert_blocks(ids, experts, None if bucket["rows"] == 1 else bucket["rows"])
            rows = tokens if gated else tokens * top_k
            a = torch.randn(rows, k, device=device, dtype=dtype)
            w = torch.randn(experts, n, k, device=device, dtype=dtype) * k**-0.5
            if bucket.get("transposed"):  # stored [E, K, N], as the model's parameter is
                w = w.transpose(1, 2).contiguous().transpose(1, 2)
            route_weights = None if gated else torch.rand(tokens * top_k, device=device, dtype=dtype)
            if bucket["fp8"]:
                (a8, a_scale), (w8, w_scale) = quantize_rows(a), fp8.quantize_experts(w)
                sets.append((a8, w8, route_weights, blocks, (a_scale, w_scale), a, None))
            elif bucket.get("mxfp4"):
                w_bytes, w_exponents = mxfp4.random_mxfp4(experts, n, k, device)
                sets.append((a, w_bytes, route_weights, blocks, None, None, w_exponents))
            else:
                sets.append((a, w, route_weights, blocks, None, None, None))
        return sets

    def reference(self, a, w, route_weights, blocks: triton_moe.ExpertBlocks, scales, like, exponents) -> torch.Tensor:
        """Each pair's row through its expert's weight in float32 (e4m3 values times their scales, MXFP4 ones
        dequantized), as the ops' references compute the GEMM; down's summed over each token's pairs."""
        ids = blocks.block_expert if blocks.sorted_pairs is None else _pair_experts(blocks)
        out = torch.empty(blocks.pairs, w.shape[1] // 2 if route_weights is None else w.shape[1], device=a.device)
        a_values = a.float()
        w_values = w.float() if exponents is None else mxfp4.dequantize_mxfp4(w, exponents, torch.float32)
        if scales is not None:
            a_values, w_values = a_values * scales[0], w_values * scales[1][..., None]
        for expert in ids.unique().tolist():
            pairs = (ids == expert).nonzero().squeeze(1)
            rows = a_values[pairs // blocks.top_k] if route_weights is None else a_values[pairs]
            h = rows @ w_values[expert].t()
            out[pairs] = (
                op.ACTIVATIONS["silu"](h, ()) if route_weights is None else h * route_weights[pairs, None].float()
            )
        return out if route_weights is None else out.view(-1, blocks.top_k, out.shape[1]).sum(dim=1)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return 2.0**-6, 2.0**-6  # a few roundings of the output's dtype (the kernel rounds where the model does)

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        """A bucket per expert weight shape of the graph's `triton` experts calls, both GEMMs, every row mode."""
        shapes, experts_ops = set(), op.experts_ops()
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in experts_ops or node.args[-1] != "triton":
                continue
            fp8_op, mxfp4_op = node.target is experts_ops[1], node.target is experts_ops[2]
            top_k = _top_k(node.args[1])
            w13, w2 = (_weight_layout(gm, arg) for arg in (node.args[3:6:2] if fp8_op or mxfp4_op else node.args[3:5]))
            if top_k is None or w13 is None or w2 is None:
                continue  # a graph this tuning cannot read: the calls run the default tile
            if mxfp4_op:  # bytes [E, N, K / 2]: the bucket names the weight's columns
                w13, w2 = (*w13[:2], 2 * w13[2], w13[3]), (*w2[:2], 2 * w2[2], w2[3])
            shapes |= {(*w13, True, fp8_op, mxfp4_op, top_k), (*w2, False, fp8_op, mxfp4_op, top_k)}
        return [
            {"experts": e, "n": n, "k": k, "gated": gated, "fp8": fp8_op, "top_k": top_k, "rows": rows,
             **({"mxfp4": True} if mxfp4_op else {}), **({"transposed": True} if transposed else {})}  # older keys kept
            for e, n, k, transposed, gated, fp8_op, mxfp4_op, top_k in sorted(shapes)
            for rows in ROW_MODES
        ]  # fmt: skip

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        key = (device_index(device), bucket["experts"], bucket["n"], bucket["k"], bucket["rows"], _format(bucket))
        triton_moe.TUNED_TILES[key] = dict(candidate.config)


def _format(bucket: dict) -> str:
    """triton_moe.weight_format of a bucket's weights."""
    return "mxfp4" if bucket.get("mxfp4") else "fp8" if bucket["fp8"] else "float"


def _pair_experts(blocks: triton_moe.ExpertBlocks) -> torch.Tensor:
    """The expert of each pair, from the sorted blocks."""
    experts = blocks.block_expert.repeat_interleave(blocks.block_m)
    real = blocks.sorted_pairs < blocks.pairs
    ids = torch.empty(blocks.pairs, dtype=experts.dtype, device=experts.device)
    ids[blocks.sorted_pairs[real]] = experts[real]
    return ids


def _top_k(ids: torch.fx.Node) -> int | None:
    """k of the top-k whose indices the experts call takes (`getitem(topk(x, k), 1)`, maybe reshaped, or the fused
    routers' `getitem(moe_route(logits, k, ...), 1)`, `getitem(moe_route_grouped(logits, bias, k, ...), 1)`)."""
    while isinstance(ids, torch.fx.Node) and ids.op == "call_function":
        if ids.target in (torch.ops.aten.topk.default, torch.ops.compiled_llm.moe_route.default):
            return int(ids.args[1])
        if ids.target is torch.ops.compiled_llm.moe_route_grouped.default:
            return int(ids.args[2])
        ids = ids.args[0]
    return None


def _weight_layout(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[int, int, int, bool] | None:
    """(E, N, K, transposed) of an expert weight argument [E, N, K]: a parameter, or a transposed view of one (read
    through the parameter: a graph loaded from the cache has no fake values), whose K is then not contiguous."""
    if node.op == "get_attr":
        return (*graph_value(gm, node).shape, False)
    if node.op == "call_function" and node.target is torch.ops.aten.transpose.int and node.args[0].op == "get_attr":
        shape = list(graph_value(gm, node.args[0]).shape)
        dims = [d % 3 for d in node.args[1:3]]
        shape[dims[0]], shape[dims[1]] = shape[dims[1]], shape[dims[0]]
        return (*shape, 2 in dims)
    return None


register(MoeGroupedGemmTuning())
