"""shard_experts: split each MoE layer's experts over `expert_parallel_size` ranks (expert parallelism): rank r keeps
experts [r * E/n, (r + 1) * E/n), every rank routes every token as the model does, computes the token-expert pairs
routed to its own experts, and an all-reduce that Inductor sees (a functional collective) sums the ranks' parts.

    w, ids = router(h)                                          w, ids = router(h)          # every rank, every token
                                                                ids = sub(ids, r * E/n)     # this rank's at [0, E/n)
    y = moe_experts(h, ids, w, W13, W2, b13, b2, act, ...)  ->  y = moe_experts(h, ids, w, W13_r, W2_r, b13_r, b2_r,
        # W13 [E, 2I, H], W2 [E, H, I]                                          act, ...)  # W13_r [E/n, 2I, H], ...
                                                                y = wait_tensor(all_reduce(y, "sum", group))

Exact by the op's contract (custom_ops/moe/op.py): an id outside [0, E/n) selects no expert and its pair adds zero,
so each rank's y is the sum over the pairs routed to its experts, and the ranks' y add up to every pair's (in the
model's dtype: each rank's part is rounded once before the sum, as a row-parallel linear's is).

How it combines with tensor parallelism (CompileConfig.expert_parallel_size): expert parallelism runs over the
tensor-parallel group, as vLLM's does. tensor_parallel_size == expert_parallel_size: attention and the dense linears
are split by shard_tensor_parallel over the same ranks, whose row-parallel all-reduce leaves every rank the whole
hidden state the router and the experts read; tensor_parallel_size=1: attention is replicated, each rank computes it
whole. The config refuses other combinations (tensor_parallel_size > 1 alone splits features, below). Experts the
capture did not route to the op (transformers' forward, counted by insert_fused_moe) stay whole on every rank:
correct, not split.

Without expert parallelism, tensor_parallel_size > 1 splits each expert by its intermediate features instead, as a
tensor-parallel MLP is split (split_features): rank r keeps features [r * I/n, (r + 1) * I/n) of every expert,

    y = moe_experts(h, ids, w, W13, W2, b13, b2, act)  ->  y = moe_experts(h, ids, w, W13_r, W2_r, b13_r, b2 | None, act)
        # W13 [E, 2I, H]: gate | up rows (silu),                   # W13_r [E, 2I/n, H]: its gate and up rows,
        # interleaved (swiglu_oai); W2 [E, H, I]                   # W2_r [E, H, I/n]; b2 on rank 0 only
                                                             y = wait_tensor(all_reduce(y, "sum", group))

exact because the gated activation works feature by feature: each rank's pairs give their share of the down
projection's sum over features, and the ranks' shares add up (b2 is added on rank 0 only). Experts whose weights hold
a checkpoint's FP8 or MXFP4 tensors, or of an activation not listed here, or whose features the ranks do not divide,
stay whole on every rank (correct, not split), and the report says so.

Runs after shard_tensor_parallel (which refuses an experts op reading a value split over the ranks) and before
quantize_fp8 (which quantizes the rank's experts only) and fuse_moe_routing (which keeps the shift after its router).
"""

from __future__ import annotations

import torch
import torch.fx

from compiled_llm.parallel_ranks import parallel_rank
from custom_ops.moe import EXPERTS_OPS
from fx_passes.expert_ops import erase_unused_weights, expert_parameter
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass
from fx_passes.sharding import TensorParallelError, checkpoint_format, shard_attr, sum_over_ranks

aten = torch.ops.aten


def _refuse(node: torch.fx.Node, world: int, why: str):
    raise TensorParallelError(f"expert_parallel_size={world}: cannot split the experts of node {node.name} "
                              f"({node.target}): {why}")  # fmt: skip


def _weight_part(gm: torch.fx.GraphModule, node: torch.fx.Node, arg: torch.fx.Node, dim: int, start: int, size: int,
                 blocks: int = 1) -> torch.fx.Node:  # fmt: skip
    """A node reading [start, start + size) along `dim` (of each of `blocks`) of the experts op's weight or bias `arg`,
    a parameter or its transpose(1, 2) (whose dims 1 and 2 are the parameter's 2 and 1), made before `node`."""
    transposed = expert_parameter(gm, arg)[1]
    source = arg.args[0] if transposed else arg
    part = shard_attr(gm, source, 3 - dim if transposed and dim in (1, 2) else dim, start, size, node, blocks)
    if transposed:
        with gm.graph.inserting_before(node):
            part = insert_call(gm.graph, aten.transpose.int, (part, *arg.args[1:]))
    return part


def shard(gm: torch.fx.GraphModule, rank: int, world: int, group: str) -> int:
    """Split every experts op of `gm` in place for `rank` of `world`; returns how many."""
    graph = gm.graph
    sites = [n for n in graph.nodes if n.op == "call_function" and n.target in EXPERTS_OPS]
    for node in sites:
        if node.target is not EXPERTS_OPS[0]:  # quantize_fp8 and keep_mxfp4_experts run after this pass
            _refuse(node, world, "only the float experts op is split (its quantized forms are made from the shards)")
        x, ids, route_weights, w13, w2, b13, b2, *_ = node.args
        experts = int(w13.meta["val"].shape[0])
        if experts % world:
            _refuse(node, world, f"{world} ranks do not divide its {experts} experts")
        size = experts // world
        start = rank * size
        old = [a for a in (w13, w2, b13, b2) if isinstance(a, torch.fx.Node)]
        for arg in old:
            if expert_parameter(gm, arg) is None:
                _refuse(node, world, f"its argument {arg.name} is not one of the model's parameters (or its transpose)")
        parts = [None if a is None else _weight_part(gm, node, a, 0, start, size) for a in (w13, w2, b13, b2)]
        with graph.inserting_before(node):
            local_ids = insert_call(graph, aten.sub.Tensor, (ids, start))
        node.args = (x, local_ids, route_weights, *parts, *node.args[7:])
        erase_unused_weights(graph, old)
        sum_over_ranks(graph, node, group)
    gm.recompile()
    return len(sites)


# The rows of W13 [E, 2I, H] (its dim 1) that hold features [a, b) of the gated activation, by its name: (start, size,
# blocks) of shard_parameter for a rank's I/n of them.
def _gate_up_rows(activation: str, start: int, size: int) -> tuple[int, int, int] | None:
    if activation == "silu":  # gate rows, then up rows: [a, b) of each half
        return start, size, 2
    if activation == "swiglu_oai":  # interleaved gate and up rows: [2a, 2b)
        return 2 * start, 2 * size, 1
    return None


def _whole_because(gm: torch.fx.GraphModule, node: torch.fx.Node, world: int) -> str | None:
    """Why the experts op `node` cannot be split by features over `world` ranks (it stays whole), or None."""
    if node.target is not EXPERTS_OPS[0]:
        return "not the float experts op"
    w13, w2, b13, b2, activation = node.args[3:8]
    if _gate_up_rows(activation, 0, 1) is None:
        return f"activation {activation!r}"
    for arg in (w13, w2, b13, b2):
        found = None if arg is None else expert_parameter(gm, arg)
        if arg is not None and found is None:
            return f"{arg.name} is not one of the model's parameters"
        if found is not None and checkpoint_format(gm.get_parameter(found[0])) is not None:
            return f"{found[0]} holds an {checkpoint_format(gm.get_parameter(found[0]))} checkpoint's tensors"
    features = int(w2.meta["val"].shape[2])
    if features % world or int(w13.meta["val"].shape[1]) != 2 * features:
        return f"{world} ranks do not divide its {features} intermediate features"
    return None


def split_features(gm: torch.fx.GraphModule, rank: int, world: int, group: str) -> tuple[int, list[str]]:
    """Split every experts op of `gm` that can be by intermediate features, in place for `rank` of `world`; returns
    how many, and why each other one stays whole."""
    graph, split, whole = gm.graph, 0, []
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in EXPERTS_OPS]:
        why = _whole_because(gm, node, world)
        if why is not None:
            whole.append(f"{node.name}: {why}")
            continue
        x, ids, route_weights, w13, w2, b13, b2, activation, *rest = node.args
        size = int(w2.meta["val"].shape[2]) // world
        rows = _gate_up_rows(activation, rank * size, size)
        parts = [
            _weight_part(gm, node, w13, 1, *rows),
            _weight_part(gm, node, w2, 2, rank * size, size),
            None if b13 is None else _weight_part(gm, node, b13, 1, *rows),
            b2 if rank == 0 else None,  # added once, in rank 0's share
        ]
        node.args = (x, ids, route_weights, *parts, activation, *rest)
        erase_unused_weights(graph, [a for a in (w13, w2, b13, b2) if isinstance(a, torch.fx.Node)])
        sum_over_ranks(graph, node, group)
        split += 1
    gm.recompile()
    return split, whole


@register_pass("shard_experts")
def shard_experts(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.parallel_ranks == 1:
        return PassResult("shard_experts", 0)
    rank, world = parallel_rank(config)
    has_experts = any(n.op == "call_function" and n.target in EXPERTS_OPS for n in gm.graph.nodes)
    if config.expert_parallel_size > 1 and not has_experts:
        raise TensorParallelError(
            f"expert_parallel_size={world}: the graph has no MoE experts op (compiled_llm::moe_experts) to split: the "
            "model has no mixture-of-experts layer, or its experts are of a kind the capture does not route to the op "
            "(the log names it); use expert_parallel_size=1"
        )
    if not has_experts:
        return PassResult("shard_experts", 0)
    import torch.distributed as dist

    group = dist.group.WORLD.group_name
    if config.expert_parallel_size == 1:  # tensor parallelism alone: every expert split by its features
        layers, whole = split_features(gm, rank, world, group)
        detail = f"rank {rank} of {world}: the experts of {layers} MoE layers split by features (+{layers} all-reduces)"
        if whole:
            detail += f"; left whole on every rank: {'; '.join(whole)}"
        return PassResult("shard_experts", layers, detail)
    layers = shard(gm, rank, world, group)
    return PassResult("shard_experts", layers, f"rank {rank} of {world}: the experts of {layers} MoE layers split "
                                               f"(+{layers} all-reduces)")  # fmt: skip
