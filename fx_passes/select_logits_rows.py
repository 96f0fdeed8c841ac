"""select_logits_rows: a module that computes only the last position's logits computes the rows asked for.

    h = aten.index.Tensor(x[1, T, C], [None, tensor([-1])])      # nanoGPT: lm_head(x[:, [-1], :])
    (or aten.slice.Tensor(x, 1, -1))                            ->   h = aten.index_select(x, 1, logits_indices)
    logits = linear(h, w)[0]                                         logits = linear(h, w)[0]

Over the runtime's flat tokens the last position is the last token of the last sequence only; the rows the
runtime needs are `logits_indices`. Between the select and the output only row-wise ops may run (the LM
head, casts, soft-capping), which compute each row alone; anything else is refused, naming the op.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch._guards import detect_fake_mode

from fx_passes.causal_mask import user_line
from fx_passes.node_meta import set_fake_value
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten

# Ops after the select that compute each position's row from that row alone.
_ROW_WISE = {
    aten.linear.default, aten.to.dtype, aten._to_copy.default, aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor,
    aten.mul.Scalar, aten.tanh.default, aten.add.Tensor, aten.sub.Tensor, aten.alias.default,
}  # fmt: skip


def _constant_last_index(gm: torch.fx.GraphModule, node) -> bool:
    """Whether `node` is a constant index tensor holding just -1 (or T - 1)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in (
        aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default, aten.to.dtype, aten._to_copy.default,
    ):  # fmt: skip
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return False
    value = operator.attrgetter(node.target)(gm)
    return isinstance(value, torch.Tensor) and value.numel() == 1 and int(value.reshape(())) == -1


def _last_position_select(gm: torch.fx.GraphModule, node: torch.fx.Node, tokens) -> bool:
    if node.op != "call_function":
        return False
    source = node.args[0] if node.args else None
    val = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 3 or str(val.shape[1]) != str(tokens):
        return False
    if node.target is aten.index.Tensor:
        indices = node.args[1]
        return len(indices) == 2 and indices[0] is None and _constant_last_index(gm, indices[1])
    if node.target is aten.slice.Tensor:
        dim, start = node.args[1], node.args[2] if len(node.args) > 2 else None
        return dim == 1 and start == -1
    return False


@register_pass("select_logits_rows")
def select_logits_rows(gm: torch.fx.GraphModule, config) -> PassResult:
    if not gm.meta.get("last_position_only"):
        return PassResult("select_logits_rows", 0)
    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    tokens = placeholders["input_ids"].meta["val"].shape[0]
    selects = [n for n in graph.nodes if _last_position_select(gm, n, tokens)]
    if len(selects) != 1:
        raise ValueError(
            f"the module returns the logits of its last position only, and {len(selects)} selects of the last "
            "position were found (x[:, [-1], :] or x[:, -1:] before the LM head): cannot compute the logits of "
            "every sequence of a step; return logits for every position instead"
        )
    select = selects[0]
    output = next(n for n in graph.nodes if n.op == "output")
    downstream, frontier = [], list(select.users)
    while frontier:
        node = frontier.pop()
        if node is output or node in downstream:
            continue
        row_wise = node.target in _ROW_WISE or (node.target is aten.select.int and node.args[1:] == (0, 0))
        if not row_wise:
            raise ValueError(
                f"the module returns the logits of its last position only, and {node.format_node()} runs on that "
                f"row before the output ({user_line(node)}): cannot compute the logits of every sequence of a step"
            )
        downstream.append(node)
        frontier += node.users
    with graph.inserting_before(select):
        rows = graph.call_function(aten.index_select.default, (select.args[0], 1, placeholders["logits_indices"]))
        set_fake_value(rows)
    select.replace_all_uses_with(rows)
    graph.erase_node(select)
    for node in graph.nodes:  # their shapes had one row; now as many as logits_indices
        if node in downstream:
            _refresh_shape(node)
    graph.eliminate_dead_code()
    gm.recompile()
    gm.meta["last_position_only"] = False  # the graph now returns logits_indices' rows
    return PassResult("select_logits_rows", 1)


def _refresh_shape(node: torch.fx.Node) -> None:
    if node.target is aten.linear.default:  # fake CUDA linear rejects symbolic sizes: its shape is plain
        x, weight = node.args[0].meta["val"], node.args[1].meta["val"]
        with detect_fake_mode((x,)):
            node.meta["val"] = x.new_empty((*x.shape[:-1], weight.shape[0]))
    else:
        set_fake_value(node)
