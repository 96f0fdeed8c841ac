"""fuse_add_rms_norm_linear: a residual add and RMSNorm join the linear that reads the norm, for one kernel a batch-1
decode step instead of two.

    n, h = compiled_llm.add_rms_norm(x, r, w, eps, triton); y = compiled_llm.linear(n, W, b, triton)
                                                          (or linear_silu_mul: a gate/up projection and its activation)
    ->
    y, n, h = compiled_llm.add_rms_norm_linear(x, r, w, eps, W, b, silu_mul, triton)

At one row the op runs the GEMV with the norm in its prologue; elsewhere the two kernels as before
(custom_ops/linear/norm_linear.py). n keeps its other readers (a router's experts beside the router's linear), h the
residual stream. The first linear of the norm's readers is taken (q/k/v after fuse_parallel_linears, gate/up after
fuse_linear_silu_mul, or a MoE router); a norm in front of anything else stays. Opt-in (NORM_LINEAR_FUSIONS in
registry.py) until measured end to end on a GPU.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import custom_ops.linear  # registers the ops
import custom_ops.rms_norm  # noqa: F401
from fx_passes.node_match import calls, is_call
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten

ADD_RMS_NORM = torch.ops.compiled_llm.add_rms_norm.default
LINEARS = {torch.ops.compiled_llm.linear.default: False, torch.ops.compiled_llm.linear_silu_mul.default: True}


def _outputs(norm: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    """The norm's (normed, total) getitems (None where unused); (None, None) if it has other users."""
    found = {user.args[1]: user for user in norm.users if is_call(user, operator.getitem)}
    if len(found) != len(norm.users):
        return None, None
    return found.get(0), found.get(1)


def _rows_view(node: torch.fx.Node, normed: torch.fx.Node) -> bool:
    """Whether `node` views `normed` with its last dimension kept (a MoE block's view(-1, hidden) before its router)."""
    if not (is_call(node, aten.view.default) or is_call(node, aten.reshape.default)) or node.args[0] is not normed:
        return False
    sizes = node.args[1]
    return len(sizes) >= 1 and sizes[-1] == normed.meta["val"].shape[-1]


def _linear_reading(normed: torch.fx.Node, position: dict) -> tuple[torch.fx.Node, torch.fx.Node | None] | None:
    """(linear, view): the first `triton` linear in graph order (`position`: each node's index) over `normed` (or over
    a rows view of it, `view`) with a parameter's weight and bias."""
    readers = [(user, None) for user in normed.users]
    readers += [(user, view) for view in normed.users if _rows_view(view, normed) for user in view.users]
    for user, view in sorted(readers, key=lambda pair: position[pair[0]]):
        if user.target in LINEARS and user.args[0] is (view or normed) and user.args[3] == "triton":
            weight, bias = user.args[1], user.args[2]
            if weight.op == "get_attr" and (bias is None or bias.op == "get_attr"):
                return user, view
    return None


@register_pass("fuse_add_rms_norm_linear")
def fuse_add_rms_norm_linear(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    sites = 0
    # Nodes this pass inserts are not ranked: it reads the rank of existing readers only
    position = {node: i for i, node in enumerate(graph.nodes)}
    for norm in calls(graph, ADD_RMS_NORM):
        x, residual, norm_weight, eps, backend = norm.args
        normed, total = _outputs(norm)
        if backend != "triton" or normed is None:
            continue
        if normed.meta["val"].dtype != x.meta["val"].dtype:  # a wider norm weight: not the GEMV's operand
            continue
        found = _linear_reading(normed, position)
        if found is None:
            continue
        linear, view = found
        _, weight, bias, _ = linear.args
        with graph.inserting_before(norm.next):  # in order, right after the norm
            # The linear's parameters, defined again here: the graph may define them only further down.
            params = []
            for param in (weight, bias):
                if param is not None:
                    param = graph.get_attr(param.target)
                    param.meta["val"] = linear.args[len(params) + 1].meta["val"]
                params.append(param)
            total_val = total.meta["val"] if total is not None else x.meta["val"]
            y_val = linear.meta["val"]
            if view is not None:  # y over x's rows, viewed as the linear's afterwards
                y_val = y_val.new_empty(*normed.meta["val"].shape[:-1], y_val.shape[-1])
            fused = insert_call(
                graph, torch.ops.compiled_llm.add_rms_norm_linear.default,
                (x, residual, norm_weight, eps, *params, LINEARS[linear.target], "triton"),
                val=(y_val, normed.meta["val"], total_val),
            )  # fmt: skip
            outputs = [insert_call(graph, operator.getitem, (fused, i), val=fused.meta["val"][i]) for i in range(3)]
        y = outputs[0]
        if view is not None:  # where the linear was: the view's sizes may be computed after the norm
            with graph.inserting_before(linear):
                y = insert_call(graph, view.target, (y, [*view.args[1][:-1], y_val.shape[-1]]), val=linear.meta["val"])
        linear.replace_all_uses_with(y)
        graph.erase_node(linear)
        normed.replace_all_uses_with(outputs[1])
        if total is not None:
            total.replace_all_uses_with(outputs[2])
        sites += 1
    graph.eliminate_dead_code()
    return PassResult("fuse_add_rms_norm_linear", sites, f"{sites} residual adds + RMSNorms in their linear's kernel"
                      if sites else "")  # fmt: skip
