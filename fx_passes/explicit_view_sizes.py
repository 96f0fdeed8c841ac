"""explicit_view_sizes: a view's -1 becomes the size it stands for, where that size is a constant.

    x = aten.reshape(q, [1, T, 4, -1, 2])   ->   x = aten.reshape(q, [1, T, 4, 4, 2])

Inferring the -1 divides the element count by the other sizes; over the runtime's token count, which is
unbacked (no size is assumed), Dynamo cannot decide that division is exact and stops with "Could not guard
on data-dependent expression" (gpt-fast's RoPE, `x.reshape(*x.shape[:-1], -1, 2)`). Export already knows
the size; writing it in removes the division.
"""

from __future__ import annotations

import torch
import torch.fx

from fx_passes.node_match import VIEWS
from fx_passes.registry import PassResult, register_pass


@register_pass("explicit_view_sizes")
def explicit_view_sizes(gm: torch.fx.GraphModule, config) -> PassResult:
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in VIEWS or not isinstance(node.args[1], (list, tuple)):
            continue
        sizes, shape = list(node.args[1]), node.meta["val"].shape
        if -1 not in sizes or len(sizes) != len(shape):
            continue
        dim = sizes.index(-1)
        if not isinstance(shape[dim], int):
            continue  # the inferred size depends on the tokens: Dynamo must infer it
        sizes[dim] = shape[dim]
        node.args = (node.args[0], sizes, *node.args[2:])
        rewritten += 1
    gm.recompile()
    return PassResult("explicit_view_sizes", rewritten)
