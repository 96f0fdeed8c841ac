"""fuse_rms_norm: HF's RMSNorm, with the residual add in front of it, becomes one op (one kernel).

    h = add(x, r); h32 = to(h, f32); n = mul(h32, rsqrt(add(mean(pow(h32, 2), [-1]), eps)))
    y = mul(w, to(n, h.dtype))          (gpt-fast and Meta: mul(h32, h32) for the square, type_as(n, h))
    ->
    y, h = compiled_llm.add_rms_norm(x, r, w, eps, backend)      (compiled_llm.rms_norm without the add)

Only where `CompileConfig.norm_backend` resolves to `triton`; the casts are absent in float32 models.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import custom_ops.rms_norm  # noqa: F401  (registers the ops)
from fx_passes.kernel_backend import resolve_triton_backend
from fx_passes.node_match import calls, is_call, only_user, single_use_call
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten


def _other(node: torch.fx.Node, arg) -> object:
    """The argument of a two-argument node that is not `arg`."""
    a, b = node.args[:2]
    return b if a is arg else a if b is arg else None


def _match(rsqrt: torch.fx.Node) -> dict | None:
    """The RMSNorm around an rsqrt node: its input h, weight, eps, and the node its output replaces."""
    add_eps = rsqrt.args[0]
    if not (single_use_call(add_eps, aten.add.Tensor) and isinstance(add_eps.args[1], float)):
        return None
    mean = add_eps.args[0]
    if not (single_use_call(mean, aten.mean.dim) and len(mean.args) > 2 and mean.args[2]):
        return None
    if add_eps.kwargs or mean.kwargs or len(mean.args) > 3:  # alpha, a dtype: another computation
        return None
    square = mean.args[0]
    if single_use_call(square, aten.pow.Tensor_Scalar) and square.args[1] == 2:
        h32 = square.args[0]
    elif single_use_call(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
        h32 = square.args[0]
    else:
        return None
    if not isinstance(h32, torch.fx.Node):
        return None
    if h32.meta["val"].dtype != torch.float32:  # the kernel computes in float32, as HF's norm does
        return None
    ndim = h32.meta["val"].dim()
    if list(mean.args[1]) not in ([-1], [ndim - 1]):
        return None
    scaled = only_user(rsqrt)
    if not (is_call(scaled, aten.mul.Tensor) and _other(scaled, rsqrt) is h32):
        return None
    h = h32.args[0] if is_call(h32, aten.to.dtype) and h32.args[1] == torch.float32 else h32
    if h is not h32 and len(h32.users) != 2:  # the float32 copy feeds the norm only
        return None
    cast = only_user(scaled)
    if is_call(cast, aten.to.dtype) or is_call(cast, aten.type_as.default):
        to = cast.args[1] if is_call(cast, aten.to.dtype) else cast.args[1].meta["val"].dtype
        if to != h.meta["val"].dtype:
            return None
    elif h is h32:
        cast = scaled  # a float32 model: no casts around the norm
    else:
        return None
    out = only_user(cast)
    weight = _other(out, cast) if is_call(out, aten.mul.Tensor) else None
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return None
    if tuple(weight.meta["val"].shape) != (h.meta["val"].shape[-1],):
        return None
    return {"h": h, "weight": weight, "eps": add_eps.args[1], "out": out}


def _residual_add(h: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(x, r) if h = x + r over two tensors of h's shape and dtype."""
    if not is_call(h, aten.add.Tensor) or len(h.args) != 2 or h.kwargs:
        return None
    x, r = h.args
    same = all(
        isinstance(a, torch.fx.Node) and a.meta["val"].shape == h.meta["val"].shape and a.meta["val"].dtype == h.meta["val"].dtype
        for a in (x, r)
    )  # fmt: skip
    return (x, r) if same else None


@register_pass("fuse_rms_norm")
def fuse_rms_norm(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    matches = [m for m in map(_match, calls(graph, aten.rsqrt.default)) if m]
    if not matches:
        return PassResult("fuse_rms_norm", 0)
    backend, why = resolve_triton_backend("norm_backend", config.norm_backend, matches[0]["h"].meta["val"].device.type)
    if backend == "torch":
        return PassResult("fuse_rms_norm", 0, f"norms left to Inductor ({why})")
    with_add = 0
    for m in matches:
        h, out = m["h"], m["out"]
        added = _residual_add(h)
        # Right after h, so that every user of h can read the op's sum instead; with its own weight node,
        # which the graph may only define further down.
        with graph.inserting_before(h.next):
            weight = graph.get_attr(m["weight"].target)
            weight.meta["val"] = m["weight"].meta["val"]
            if added:
                fused = insert_call(graph, torch.ops.compiled_llm.add_rms_norm.default, (*added, weight, m["eps"], backend),
                                    val=(out.meta["val"], h.meta["val"]))  # fmt: skip
                normed = insert_call(graph, operator.getitem, (fused, 0), val=out.meta["val"])
                total = insert_call(graph, operator.getitem, (fused, 1), val=h.meta["val"])
                with_add += 1
            else:
                normed = insert_call(graph, torch.ops.compiled_llm.rms_norm.default, (h, weight, m["eps"], backend),
                                     val=out.meta["val"])  # fmt: skip
        out.replace_all_uses_with(normed)
        if added:
            h.replace_all_uses_with(total)  # the residual stream now reads the op's sum
    graph.eliminate_dead_code()
    return PassResult("fuse_rms_norm", len(matches), f"{len(matches)} RMSNorms ({with_add} with their residual add) -> {backend}")
