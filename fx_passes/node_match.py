"""Small predicates the pattern-matching passes share."""

from __future__ import annotations

import torch.fx


def is_call(node, target) -> bool:
    """Whether `node` is an FX node calling `target`."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def calls(graph: torch.fx.Graph, target) -> list[torch.fx.Node]:
    """The nodes of `graph` that call `target`, in graph order."""
    return [node for node in graph.nodes if is_call(node, target)]


def single_use_call(node, target) -> bool:
    """Whether `node` calls `target` and feeds exactly one node."""
    return is_call(node, target) and len(node.users) == 1


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None
