"""insert_fused_moe: each MoE layer's experts, captured as the canonical op, get the backend that runs them.

    y = compiled_llm.moe_experts(x, ids, weights, w13, w2, b13, b2, act, params, "torch")   (capture: expert_routing)
    ->
    y = compiled_llm.moe_experts(x, ids, weights, w13, w2, b13, b2, act, params, backend)  (CompileConfig.moe_backend)

and alike for `moe_experts_fp8` (quantize_fp8's, under quantization="fp8") and `moe_experts_mxfp4`
(keep_mxfp4_experts', an MXFP4 checkpoint's).

The router before it (softmax or sigmoid, top-k, renormalisation) stays for Inductor to fuse. Experts the
capture could not route still run transformers' grouped GEMMs: the report counts them.
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.linear.fp8 import fp8_tensor_cores
from custom_ops.moe import EXPERTS_OPS
from fx_passes.kernel_backend import resolve_triton_backend
from fx_passes.node_match import calls
from fx_passes.registry import PassResult, register_pass

FORMATS = dict(zip(EXPERTS_OPS, ("", "FP8 ", "MXFP4 ")))  # by op, for the report


def _grouped_mm_calls(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and "grouped_mm" in str(n.target))


@register_pass("insert_fused_moe")
def insert_fused_moe(gm: torch.fx.GraphModule, config) -> PassResult:
    left = _grouped_mm_calls(gm.graph)
    unrouted = f"; {left} grouped_mm calls of experts it does not take left as they are" if left else ""
    detail, count = [], 0
    for op, fmt in FORMATS.items():
        sites = calls(gm.graph, op)
        if sites:
            device = sites[0].args[0].meta["val"].device
            backend, why = resolve_triton_backend("moe_backend", config.moe_backend, device.type)
            fp8 = fmt == "FP8 "
            if fp8 and backend == "triton" and config.moe_backend == "auto" and not fp8_tensor_cores(device.index):
                backend, why = "torch", "auto: no FP8 tensor cores before compute capability 8.9"
            for node in sites:
                node.args = (*node.args[:-1], backend)
            detail.append(f"{len(sites)} {fmt}MoE layers -> {backend} ({why})")
            count += len(sites)
    return PassResult("insert_fused_moe", count, (", ".join(detail) + unrouted).removeprefix("; "))
