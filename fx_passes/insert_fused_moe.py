"""insert_fused_moe: each MoE layer's experts, captured as the canonical op, get the backend that runs them.

    y = compiled_llm.moe_experts(x, ids, weights, w13, w2, b13, b2, act, "torch")      (capture: expert_routing.py)
    ->
    y = compiled_llm.moe_experts(x, ids, weights, w13, w2, b13, b2, act, backend)     (CompileConfig.moe_backend)

The router before it (softmax or sigmoid, top-k, renormalisation) stays for Inductor to fuse. Experts the
capture could not route still run transformers' grouped GEMMs: the report counts them.
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.moe import moe_backend
from fx_passes.node_match import calls
from fx_passes.registry import PassResult, register_pass

MOE_EXPERTS = torch.ops.compiled_llm.moe_experts.default


def _grouped_mm_calls(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and "grouped_mm" in str(n.target))


@register_pass("insert_fused_moe")
def insert_fused_moe(gm: torch.fx.GraphModule, config) -> PassResult:
    sites = calls(gm.graph, MOE_EXPERTS)
    left = _grouped_mm_calls(gm.graph)
    unrouted = f"; {left} grouped_mm calls of experts it does not take left as they are" if left else ""
    if not sites:
        return PassResult("insert_fused_moe", 0, unrouted.removeprefix("; "))
    backend, why = moe_backend(sites[0].args[0].meta["val"].device, config.moe_backend)
    for node in sites:
        node.args = (*node.args[:-1], backend)
    return PassResult("insert_fused_moe", len(sites), f"{len(sites)} MoE layers -> {backend} ({why}){unrouted}")
