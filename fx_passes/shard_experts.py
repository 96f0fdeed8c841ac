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
whole. The config refuses other combinations. Experts the capture did not route to the op (transformers' forward,
counted by insert_fused_moe) stay whole on every rank: correct, not split.

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
from fx_passes.sharding import TensorParallelError, shard_attr, sum_over_ranks

aten = torch.ops.aten


def _refuse(node: torch.fx.Node, world: int, why: str):
    raise TensorParallelError(f"expert_parallel_size={world}: cannot split the experts of node {node.name} "
                              f"({node.target}): {why}")  # fmt: skip


def _rank_part(gm: torch.fx.GraphModule, node: torch.fx.Node, arg: torch.fx.Node, start: int, size: int,
               world: int) -> torch.fx.Node:  # fmt: skip
    """A node reading experts [start, start + size) of the experts op's weight or bias `arg` (a parameter, or its
    transpose(1, 2) where the model stores the weight transposed), made before `node`."""
    found = expert_parameter(gm, arg)
    if found is None:
        _refuse(node, world, f"its argument {arg.name} is not one of the model's parameters (or its transpose)")
    part = shard_attr(gm, arg.args[0] if found[1] else arg, 0, start, size, node)
    if found[1]:
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
        parts = [None if a is None else _rank_part(gm, node, a, start, size, world) for a in (w13, w2, b13, b2)]
        with graph.inserting_before(node):
            local_ids = insert_call(graph, aten.sub.Tensor, (ids, start))
        node.args = (x, local_ids, route_weights, *parts, *node.args[7:])
        erase_unused_weights(graph, old)
        sum_over_ranks(graph, node, group)
    gm.recompile()
    return len(sites)


@register_pass("shard_experts")
def shard_experts(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.expert_parallel_size == 1:
        return PassResult("shard_experts", 0)
    rank, world = parallel_rank(config)
    if not any(n.op == "call_function" and n.target in EXPERTS_OPS for n in gm.graph.nodes):
        raise TensorParallelError(
            f"expert_parallel_size={world}: the graph has no MoE experts op (compiled_llm::moe_experts) to split: the "
            "model has no mixture-of-experts layer, or its experts are of a kind the capture does not route to the op "
            "(the log names it); use expert_parallel_size=1"
        )
    import torch.distributed as dist

    layers = shard(gm, rank, world, dist.group.WORLD.group_name)
    return PassResult("shard_experts", layers, f"rank {rank} of {world}: the experts of {layers} MoE layers split "
                                               f"(+{layers} all-reduces)")  # fmt: skip
