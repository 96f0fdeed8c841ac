"""Small predicates the pattern-matching passes share."""

from __future__ import annotations

import torch
import torch.fx

aten = torch.ops.aten
# Casts that return their input itself when it already has the dtype and device asked for (and otherwise a
# converted copy that holds the same values): Meta's `self.cache_k.to(xq)`, `self.freqs_cis.to(h.device)`.
CASTS = (aten.to.device, aten.to.dtype, aten.to.dtype_layout, aten.alias.default)


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


def through_casts(node):
    """`node` with the casts (CASTS) that produced it skipped."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    return node
