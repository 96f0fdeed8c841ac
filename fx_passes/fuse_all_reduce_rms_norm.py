"""fuse_all_reduce_rms_norm: a row-parallel linear's sum over the ranks, with the residual add and the RMSNorm that
read it, becomes one op, whose sum can run one-shot over symmetric memory for small messages
(custom_ops/all_reduce: NCCL's ring otherwise, the same numerics).

    s = wait_tensor(all_reduce(y, "sum", group)); n, h = add_rms_norm(s, r, w, eps, backend)
    ->
    n, h = all_reduce_add_rms_norm(y, r, w, eps, group, backend)

Where the sum's only reader is an add_rms_norm (as its x or its residual: x + r is the same sum either way), which
fuse_rms_norm makes where `norm_backend` resolves to `triton`; the embedding's sum, read by a norm without an add, and
an all-reduce whose sum other nodes read too stay as they are.
"""

from __future__ import annotations

import torch
import torch.fx

import custom_ops  # noqa: F401  (registers the ops)
from fx_passes.node_match import calls, single_use_call
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass
from fx_passes.sharding import ALL_REDUCE, WAIT

ADD_RMS_NORM = torch.ops.compiled_llm.add_rms_norm.default
ALL_REDUCE_ADD_RMS_NORM = torch.ops.compiled_llm.all_reduce_add_rms_norm.default


def _summed(node) -> tuple[torch.fx.Node, str] | None:
    """(y, group) where `node` is wait_tensor(all_reduce(y, "sum", group)) read by one node, else None."""
    if not (single_use_call(node, WAIT) and single_use_call(node.args[0], ALL_REDUCE)):
        return None
    y, op, group = node.args[0].args[:3]
    return (y, group) if op == "sum" else None


@register_pass("fuse_all_reduce_rms_norm")
def fuse_all_reduce_rms_norm(gm: torch.fx.GraphModule, config) -> PassResult:
    graph, sites = gm.graph, 0
    for norm in calls(graph, ADD_RMS_NORM):
        x, residual, weight, eps, backend = norm.args
        for wait, other in ((x, residual), (residual, x)):
            found = _summed(wait)
            if found is None:
                continue
            y, group = found
            with graph.inserting_before(norm):
                fused = insert_call(graph, ALL_REDUCE_ADD_RMS_NORM, (y, other, weight, eps, group, backend),
                                    val=norm.meta["val"])  # fmt: skip
            norm.replace_all_uses_with(fused)
            reduce = wait.args[0]
            graph.erase_node(norm)
            graph.erase_node(wait)
            graph.erase_node(reduce)
            sites += 1
            break
    gm.recompile()
    return PassResult("fuse_all_reduce_rms_norm", sites, "all-reduce + residual add + RMSNorm, one op" if sites else "")
