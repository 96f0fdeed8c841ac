"""Fake-tensor metadata for nodes a pass creates, so later passes can read shapes off `meta["val"]`."""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map


def set_fake_value(node: torch.fx.Node) -> None:
    """Compute `node.meta["val"]` by running its target on its inputs' fake values."""

    def fake(arg):
        return arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg

    args, kwargs = tree_map(fake, (node.args, node.kwargs))
    fake_mode = detect_fake_mode(args)
    if fake_mode is None:
        raise ValueError(f"cannot infer metadata of {node.format_node()}: its inputs carry no fake values")
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)


def insert_call(graph: torch.fx.Graph, target, args: tuple, kwargs: dict | None = None, val=None) -> torch.fx.Node:
    """`graph.call_function` plus its fake value: `val` if given, else computed by running the target on
    fake inputs (give `val` for ops whose CUDA fake kernels reject symbolic sizes, such as aten.linear)."""
    node = graph.call_function(target, args, kwargs or {})
    if val is not None:
        node.meta["val"] = val
    else:
        set_fake_value(node)
    return node


def insert_chain(graph: torch.fx.Graph, after: torch.fx.Node, calls: list[tuple]) -> torch.fx.Node:
    """Insert `calls` (target, args, kwargs) in order after `after`, a None in args standing for the previous call's
    node (with their fake values); returns the last."""
    node = None
    for target, args, kwargs in calls:
        with graph.inserting_after(after):
            node = after = insert_call(graph, target, tuple(node if a is None else a for a in args), kwargs)
    return node


def insert_outputs(graph: torch.fx.Graph, node: torch.fx.Node) -> list[torch.fx.Node]:
    """A getitem node (with its fake value) for each output of `node`, an op that returns a tuple."""
    return [insert_call(graph, operator.getitem, (node, i), val=val) for i, val in enumerate(node.meta["val"])]
