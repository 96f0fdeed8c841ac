"""insert_linear_op: the graph's linears call `compiled_llm.linear`, whose backend picks a kernel per call.

    y = linear(x, W, b)
    ->
    y = compiled_llm.linear(x, W, b, backend)

Only where `CompileConfig.linear_backend` resolves to a backend other than `torch` (see its docstring):
with `torch` the linears stay aten ops, which Inductor calls without any Python in between.
"""

from __future__ import annotations

import torch
import torch.fx

import custom_ops.linear  # noqa: F401  (registers compiled_llm::linear)
from fx_passes.kernel_backend import resolve_triton_backend
from fx_passes.registry import PassResult, register_pass

LINEAR = torch.ops.aten.linear.default


@register_pass("insert_linear_op")
def insert_linear_op(gm: torch.fx.GraphModule, config) -> PassResult:
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR]
    if not sites:
        return PassResult("insert_linear_op", 0)
    device_type = sites[0].args[1].meta["val"].device.type
    backend, why = resolve_triton_backend("linear_backend", config.linear_backend, device_type)
    if backend == "torch":
        return PassResult("insert_linear_op", 0, f"linears left to Inductor ({why})")
    for node in sites:
        x, weight, *rest = node.args
        bias = rest[0] if rest else None
        with gm.graph.inserting_before(node):
            op = gm.graph.call_function(torch.ops.compiled_llm.linear.default, (x, weight, bias, backend))
        op.meta.update(node.meta)
        node.replace_all_uses_with(op)
        gm.graph.erase_node(node)
    return PassResult("insert_linear_op", len(sites), f"{len(sites)} linears -> {backend} ({why})")
