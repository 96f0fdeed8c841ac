"""What the passes that rewrite an experts op share: which parameter an experts weight argument reads, and the swap of
one experts op for another over other weight tensors (quantize_fp8's e4m3 experts, keep_mxfp4_experts' MXFP4 ones)."""

from __future__ import annotations

import torch
import torch.fx


def expert_parameter(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, bool] | None:
    """(parameter name, stored transposed) of an experts op's weight argument: a parameter or its transpose(1, 2)."""
    transposed = node.op == "call_function" and node.target is torch.ops.aten.transpose.int
    if transposed and sorted(d % 3 for d in node.args[1:3]) == [1, 2]:
        found = expert_parameter(gm, node.args[0])
        return (found[0], True) if found is not None and not found[1] else None
    if node.op != "get_attr":
        return None
    try:
        gm.get_parameter(node.target)  # the recipe reads a parameter (a buffer is not the model's weight)
    except AttributeError:
        return None
    return node.target, False


def swap_experts_op(graph: torch.fx.Graph, node: torch.fx.Node, target, weights: list[torch.fx.Node]) -> torch.fx.Node:
    """`moe_experts(x, ids, w, W13, W2, b13, b2, act, params, backend)` -> `target(x, ids, w, *weights, b13, b2, act,
    params, backend)` (an experts op of another weight format); the float weights (and their transposes) it read,
    read by no other node, are erased."""
    x, ids, route_weights, w13, w2, b13, b2, activation, params, backend = node.args
    with graph.inserting_before(node):
        op = graph.call_function(target, (x, ids, route_weights, *weights, b13, b2, activation, params, backend))
    op.meta.update(node.meta)
    node.replace_all_uses_with(op)
    graph.erase_node(node)
    erase_unused_weights(graph, [w13, w2])
    return op


def erase_unused_weights(graph: torch.fx.Graph, weights: list[torch.fx.Node]) -> None:
    """Erase the experts weights `weights` (get_attr nodes, or their transposes with the get_attr under them) that no
    node reads any more."""
    for weight in weights:
        for unused in (weight, *weight.args[:1]):
            if isinstance(unused, torch.fx.Node) and not unused.users:
                graph.erase_node(unused)
