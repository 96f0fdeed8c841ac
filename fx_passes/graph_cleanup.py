"""graph_cleanup: drop what export leaves behind that computes nothing.

    x1 = aten.to.dtype(x, float32)   # x already float32
    _assert_tensor_metadata(x1)       ->   y = relu(x)
    x2 = aten.view(x1, x.shape)
    y = relu(x2)

Identical views of one tensor become one node: every layer's `unsqueeze(cos, 1)` of the shared RoPE
table, for instance, which Inductor would otherwise materialize once per layer.
"""

from __future__ import annotations

import torch
import torch.fx

from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten

_ASSERTS = (aten._assert_tensor_metadata.default,)
_CASTS = (aten.to.dtype, aten.type_as.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten.contiguous.default, aten.alias.default)
_SHAREABLE_VIEWS = (aten.unsqueeze.default, aten.transpose.int, aten.slice.Tensor, aten.select.int, aten.expand.default)


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same_tensor_metadata(a: torch.Tensor, b: torch.Tensor) -> bool:
    # str() compares symbolic sizes as expressions: equal only when the same symbol, never by guessing.
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and [str(s) for s in a.shape] == [str(s) for s in b.shape]
        and [str(s) for s in a.stride()] == [str(s) for s in b.stride()]
    )


def _is_noop(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CASTS + _VIEWS or node.kwargs.get("copy"):
        return False
    source, result = _val(node.args[0]), _val(node)
    return source is not None and result is not None and _same_tensor_metadata(source, result)


@register_pass("graph_cleanup")
def graph_cleanup(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    removed = {"asserts": 0, "no-op casts/views": 0, "repeated views": 0, "dead": 0}
    first_view: dict[tuple, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
            removed["asserts"] += 1
        elif _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed["no-op casts/views"] += 1
        elif node.op == "call_function" and node.target in _SHAREABLE_VIEWS and not node.kwargs:
            key = (node.target, *node.args)
            if key in first_view:
                node.replace_all_uses_with(first_view[key])
                graph.erase_node(node)
                removed["repeated views"] += 1
            else:
                first_view[key] = node
    before = len(graph.nodes)
    graph.eliminate_dead_code()
    removed["dead"] = before - len(graph.nodes)
    detail = ", ".join(f"{count} {what}" for what, count in removed.items() if count)
    return PassResult("graph_cleanup", sum(removed.values()), detail)
