"""fold_weight_casts: a linear whose weight the graph widens every step reads a copy widened once.

    w32 = to(W_bf16, float32); y = linear(x32, w32)
    ->
    y = linear(x32, W_f32)              # W_f32 = W_bf16.float(), a derived parameter

DeepSeek-V2/V3's routers compute their logits in float32 from a weight the model holds in bfloat16: the widening ran
as its own kernel in every MoE layer of every step, and the linear over a computed weight stays a cuBLAS call
(insert_linear_op routes only linears over parameters to its GEMV). Widening a float to a wider float is exact, so the
graph computes the same values. Only small weights (MAX_BYTES widened) are folded: a widened LM head would hold a
second, larger copy of the model's largest weight.
"""

from __future__ import annotations

import torch
import torch.fx

from fx_passes.derived_weights import derive, recipe
from fx_passes.node_match import is_call
from fx_passes.quantize_fp8 import free_name
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
MAX_BYTES = 64 << 20  # a router's weight widened: DeepSeek-V3's 256 x 7168 is 7 MiB
# Widening casts whose result holds exactly the values of their input.
_WIDER = {torch.bfloat16: (torch.float32, torch.float64), torch.float16: (torch.float32, torch.float64),
          torch.float32: (torch.float64,)}  # fmt: skip


@recipe
def widen_parameter(gm: torch.fx.GraphModule, target: str, dtype_name: str, name: str) -> None:
    """Register `name`, the parameter `target` widened to torch.`dtype_name`."""
    weight = gm.get_parameter(target)
    gm.register_parameter(name, torch.nn.Parameter(weight.detach().to(getattr(torch, dtype_name)), requires_grad=False))


def _folded_cast(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """`to(W, dtype)` for a parameter W (not a buffer: a model's state, not its weight) that `node`, a linear, reads
    as its weight, if only linears read the cast, it widens exactly and the result is small enough; else None."""
    cast = node.args[1]
    if not is_call(cast, aten.to.dtype) or len(cast.args) != 2 or cast.kwargs:
        return None
    source, dtype = cast.args
    if not (isinstance(source, torch.fx.Node) and source.op == "get_attr"):
        return None
    try:
        weight = gm.get_parameter(source.target)
    except AttributeError:
        return None
    if dtype not in _WIDER.get(weight.dtype, ()) or weight.numel() * dtype.itemsize > MAX_BYTES:
        return None
    if any(not is_call(user, aten.linear.default) or user.args[1] is not cast for user in cast.users):
        return None
    return cast


@register_pass("fold_weight_casts")
def fold_weight_casts(gm: torch.fx.GraphModule, config) -> PassResult:
    casts = {}  # in graph order, each once
    for node in gm.graph.nodes:
        if is_call(node, aten.linear.default) and (cast := _folded_cast(gm, node)) is not None:
            casts[cast] = None
    for cast in casts:
        source, dtype = cast.args
        dtype_name = str(dtype).removeprefix("torch.")
        name = free_name(gm, f"{source.target}_{dtype_name}")
        derive(gm, widen_parameter, source.target, dtype_name, name)
        with gm.graph.inserting_before(cast):
            widened = gm.graph.get_attr(name)
        widened.meta.update(cast.meta)
        cast.replace_all_uses_with(widened)
        gm.graph.erase_node(cast)
        if not source.users:
            gm.graph.erase_node(source)
    if casts:
        gm.graph.lint()
        gm.recompile()
    return PassResult("fold_weight_casts", len(casts), f"{len(casts)} linear weights widened once" if casts else "")
