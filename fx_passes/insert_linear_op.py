"""insert_linear_op: the graph's linears call `compiled_llm.linear`, whose backend picks a kernel per call.

    y = linear(x, W, b)
    ->
    y = compiled_llm.linear(x, W, b, backend)

Only the linears for which the backend `CompileConfig.linear_backend` resolves to ever runs something
other than F.linear (none for `torch`; for `triton`, those whose shape the GEMV serves; for `onednn`,
float32 ones), decided here from the weight's shape and dtype, and only over parameters (weight and bias
`get_attr` nodes): the others stay aten ops, which Inductor calls without any Python in between.
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.linear import runs_other_than_torch  # importing it registers compiled_llm::linear
from fx_passes.kernel_backend import resolve_linear_backend
from fx_passes.node_match import calls
from fx_passes.registry import PassResult, register_pass

LINEAR = torch.ops.aten.linear.default


def _parameters(linear: torch.fx.Node) -> bool:
    """Whether weight and bias are the model's parameters. The GEMV loads its weight before waiting for
    the previous kernel (programmatic dependent launch): a weight computed in the graph could be read
    before it is written."""
    return all(arg is None or (isinstance(arg, torch.fx.Node) and arg.op == "get_attr") for arg in linear.args[1:3])


@register_pass("insert_linear_op")
def insert_linear_op(gm: torch.fx.GraphModule, config) -> PassResult:
    linears = calls(gm.graph, LINEAR)
    if not linears:
        return PassResult("insert_linear_op", 0)
    device_type = linears[0].args[1].meta["val"].device.type
    backend, why = resolve_linear_backend(config.linear_backend, device_type)
    sites = [n for n in linears if _parameters(n) and runs_other_than_torch(backend, n.args[1].meta["val"])]
    if not sites:
        return PassResult("insert_linear_op", 0, f"linears left to Inductor ({why})")
    for node in sites:
        x, weight, *rest = node.args
        bias = rest[0] if rest else None
        with gm.graph.inserting_before(node):
            op = gm.graph.call_function(torch.ops.compiled_llm.linear.default, (x, weight, bias, backend))
        op.meta.update(node.meta)
        node.replace_all_uses_with(op)
        gm.graph.erase_node(node)
    return PassResult("insert_linear_op", len(sites), f"{len(sites)} of {len(linears)} linears -> {backend} ({why})")
