"""fuse_moe_routing: an MoE router's softmax, top-k and renormalisation, feeding the layer's experts op, become one op.

    v, ids = topk(softmax(to(logits, f32), -1), k); w = to(div(v, sum(v, [-1], True)), dtype)   (Qwen3-MoE, Mixtral)
    v, ids = topk(logits, k); w = softmax(v, -1, dtype)                                        (GPT-OSS)
    v, ids = topk(softmax(logits, -1, f32), k); w = mul(v, routed_scaling_factor)             (DeepSeek-V2, greedy)
    moe_experts(x, ids, w, ...)                    (or moe_experts(x, sub(ids, start), w, ...): shard_experts')
    ->
    w, ids = compiled_llm.moe_route(logits, k, scoring, renormalize, scale, dtype, backend); moe_experts(x, ids, w, ...)

Only where the top-k's values and indices feed nothing but that chain and the experts op, and only where
`CompileConfig.moe_backend` resolves to `triton` (elsewhere Inductor keeps the ops). Grouped routers (DeepSeek-V3's
sigmoid with bias correction, DeepSeek-V2's group_limited_greedy softmax) are one `compiled_llm.moe_route_grouped` from
the capture on (compiled_llm/capture/grouped_routing.py): here they take the same backend.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from custom_ops.moe import EXPERTS_OPS
from fx_passes.kernel_backend import resolve_triton_backend
from fx_passes.node_match import calls, is_call
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten


def _outputs(topk: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(values, indices): the top-k's two getitems, if it has exactly those users."""
    found = {user.args[1]: user for user in topk.users if is_call(user, operator.getitem)}
    return (found[0], found[1]) if len(topk.users) == 2 and set(found) == {0, 1} else None


def _last_dim(node: torch.fx.Node, dim) -> bool:
    return dim in (-1, node.meta["val"].dim() - 1)


def _softmax_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """x of softmax(x, -1) computed in float32 (its dtype argument, or an input cast to it), else None."""
    if not is_call(node, aten.softmax.int) or not _last_dim(node, node.args[1]):
        return None
    x = node.args[0]
    if len(node.args) > 2 and node.args[2] == torch.float32:
        return x
    if is_call(x, aten.to.dtype) and x.args[1] == torch.float32 and len(x.users) == 1:
        return x.args[0]
    return x if x.meta["val"].dtype == torch.float32 else None


def _renormalized(values: torch.fx.Node) -> torch.fx.Node | None:
    """div(values, sum(values, [-1], True)) over the top-k values, its only users."""
    if len(values.users) != 2:
        return None
    total = next((u for u in values.users if is_call(u, aten.sum.dim_IntList)), None)
    div = next((u for u in values.users if is_call(u, aten.div.Tensor) or is_call(u, aten.div_.Tensor)), None)
    if total is None or div is None or div.args != (values, total) or len(total.users) != 1:
        return None
    if list(total.args[1]) not in ([-1], [1]) or not (len(total.args) > 2 and total.args[2]):
        return None
    return div


def _match(topk: torch.fx.Node) -> dict | None:
    outputs = _outputs(topk)
    # topk(x, k, dim=-1, largest=True, sorted): the order among the k does not matter (the experts op sums them)
    dim, largest = (list(topk.args[2:4]) + [-1, True][len(topk.args[2:4]) :])[:2]
    if outputs is None or not _last_dim(topk.args[0], dim) or largest is not True or topk.kwargs:
        return None
    values, ids = outputs
    shift = next(iter(ids.users)) if len(ids.users) == 1 else None
    if not (is_call(shift, aten.sub.Tensor) and shift.args[0] is ids and isinstance(shift.args[1], int)):
        shift = None  # else shard_experts' shift to the rank's experts, kept: ids - start
    read = shift if shift is not None else ids
    experts = [u for u in read.users if u.target in EXPERTS_OPS]
    if len(experts) != 1 or len(ids.users) != 1 or len(read.users) != 1 or experts[0].args[1] is not read:
        return None
    weights = experts[0].args[2]
    logits = _softmax_input(topk.args[0])
    if logits is not None:  # softmax, then the top-k
        scoring, end = "softmax", values
        renormalized = _renormalized(values)
        if renormalized is not None:
            end = renormalized
    else:  # the top-k of the logits, then a softmax over its values
        logits, scoring, renormalized = topk.args[0], "topk_softmax", None
        end = next(iter(values.users)) if len(values.users) == 1 else None
        if end is None or _softmax_input(end) not in (values, None) or not is_call(end, aten.softmax.int):
            return None
        if not _last_dim(end, end.args[1]) or len(end.users) != 1:
            return None
    scaled = next(iter(end.users)) if len(end.users) == 1 else None
    scale = 1.0
    # A constant factor on the chosen float32 weights (DeepSeek's): the op scales in float32, before its one rounding.
    factor = is_call(scaled, aten.mul.Tensor) and scaled.args[0] is end and isinstance(scaled.args[1], (int, float))
    if factor and end.meta["val"].dtype != torch.float32:
        return None  # torch would round before and after the factor: left to Inductor
    if factor:
        scale, end = float(scaled.args[1]), scaled
    else:
        scaled = None
    if end is not weights:
        cast = next(iter(end.users)) if len(end.users) == 1 else None
        if not (is_call(cast, aten.to.dtype) and cast is weights):
            return None
    elif scoring == "softmax" and end is values and len(values.users) != 1:
        return None
    # What the op replaces, producers first: erased last-first once unused (an in-place div_ is not dead code to FX).
    chain = [
        topk.args[0],
        topk,
        values,
        ids,
        *((shift,) if shift is not None else ()),
        *(renormalized.args[1:2] if renormalized is not None else ()),
        *(scaled.args[:1] if scaled is not None else ()),
        end,
        weights,
    ]
    if topk.args[0] is not logits and is_call(topk.args[0].args[0], aten.to.dtype):
        chain.insert(0, topk.args[0].args[0])  # the float32 cast ahead of the softmax
    return {"logits": logits, "top_k": int(topk.args[1]), "scoring": scoring, "renormalize": renormalized is not None,
            "scale": scale, "weights": weights, "ids": ids, "shift": shift, "experts": experts[0],
            "chain": chain}  # fmt: skip


@register_pass("fuse_moe_routing")
def fuse_moe_routing(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    matches = [m for m in map(_match, calls(graph, aten.topk.default)) if m]
    grouped = list(calls(graph, torch.ops.compiled_llm.moe_route_grouped.default))
    if not matches and not grouped:
        return PassResult("fuse_moe_routing", 0)
    logits = matches[0]["logits"] if matches else grouped[0].args[0]
    backend, why = resolve_triton_backend("moe_backend", config.moe_backend, logits.meta["val"].device.type)
    if backend != "triton":
        return PassResult("fuse_moe_routing", 0, f"routers left to Inductor and the ops' references ({why})")
    for node in grouped:
        node.args = (*node.args[:-1], backend)
    for m in matches:
        experts, weights = m["experts"], m["weights"]
        dtype = weights.meta["val"].dtype
        with graph.inserting_before(experts):
            route = insert_call(graph, torch.ops.compiled_llm.moe_route.default,
                                (m["logits"], m["top_k"], m["scoring"], m["renormalize"], m["scale"], dtype,
                                 backend))  # fmt: skip
            new_weights = insert_call(graph, operator.getitem, (route, 0))
            new_ids = insert_call(graph, operator.getitem, (route, 1))
            if m["shift"] is not None:
                new_ids = insert_call(graph, aten.sub.Tensor, (new_ids, m["shift"].args[1]))
        experts.args = (experts.args[0], new_ids, new_weights, *experts.args[3:])
        for node in reversed(list(dict.fromkeys(m["chain"]))):
            if node is not m["logits"] and not node.users:
                graph.erase_node(node)
    detail = f"{len(matches)} routers -> moe_route, {len(grouped)} grouped routers -> moe_route_grouped ({backend})"
    return PassResult("fuse_moe_routing", len(matches) + len(grouped), detail)
