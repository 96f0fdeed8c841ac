"""Small predicates the pattern-matching passes share."""

from __future__ import annotations

import sympy
import torch
import torch.fx

aten = torch.ops.aten
# Casts that return their input itself when it already has the dtype and device asked for (and otherwise a
# converted copy that holds the same values): Meta's `self.cache_k.to(xq)`, `self.freqs_cis.to(h.device)`.
CASTS = (aten.to.device, aten.to.dtype, aten.to.dtype_layout, aten.alias.default)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


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


def sym_expr(value) -> sympy.Expr | None:
    """A size as a sympy expression: an int, a SymInt, or a node whose value is one; None otherwise."""
    if isinstance(value, torch.fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, int):
        return sympy.Integer(value)
    return None


def slice_arguments(node: torch.fx.Node) -> tuple:
    """(dim, start, end, step) of an aten.slice.Tensor node, defaults filled in."""
    return tuple((list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4])
