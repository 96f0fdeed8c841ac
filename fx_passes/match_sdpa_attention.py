"""match_sdpa_attention: route plain causal SDPA calls (non-HF code) to the canonical attention op.

    o = aten.scaled_dot_product_attention(q[1,Hq,T,D], k[1,Hkv,T,D], v, is_causal=True)
    ->
    o = compiled_llm.attention(q[0].T(0,1), k[0].T(0,1), v[0].T(0,1), layer, scale, 0, 0.0, None)[None].T(1,2)

A call with an explicit mask, dropout or no causal flag has semantics the canonical op does not carry, so it
is left alone and named in the result; `insert_paged_attention` then refuses the graph.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from fx_passes.node_match import calls
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CANONICAL_ATTENTION = torch.ops.compiled_llm.attention.default


def sdpa_arguments(node: torch.fx.Node) -> dict:
    return normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs


def unsupported_sdpa_reason(args: dict) -> str | None:
    """Why this SDPA call cannot become a canonical attention op, or None if it can."""
    q, k = args["query"].meta["val"], args["key"].meta["val"]
    if args.get("attn_mask") is not None:
        return "explicit attn_mask"
    if args.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    if not args.get("is_causal", False):
        return "is_causal=False"
    if q.dim() != 4 or q.shape[0] != 1:
        return f"query shape {tuple(q.shape)} is not [1, heads, tokens, head_dim]"
    if q.shape[1] != k.shape[1] and not (args.get("enable_gqa") and q.shape[1] % k.shape[1] == 0):
        return f"{q.shape[1]} query heads vs {k.shape[1]} key heads without enable_gqa"
    return None


@register_pass("match_sdpa_attention")
def match_sdpa_attention(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    next_layer = 1 + max(
        (n.args[3] for n in calls(graph, CANONICAL_ATTENTION)), default=-1
    )
    matched, skipped = 0, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        args = sdpa_arguments(node)
        reason = unsupported_sdpa_reason(args)
        if reason:
            skipped.append(f"{node.name}: {reason}")
            continue
        head_dim = args["query"].meta["val"].shape[-1]
        scale = args.get("scale") or 1.0 / math.sqrt(head_dim)
        with graph.inserting_before(node):
            flat = [
                insert_call(graph, aten.transpose.int, (insert_call(graph, aten.select.int, (args[x], 0, 0)), 0, 1))
                for x in ("query", "key", "value")
            ]  # each [T, H, D]
            out = insert_call(graph, CANONICAL_ATTENTION, (*flat, next_layer, float(scale), 0, 0.0, None))
            out = insert_call(graph, aten.transpose.int, (insert_call(graph, aten.unsqueeze.default, (out, 0)), 1, 2))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        matched += 1
        next_layer += 1
    detail = f"left {len(skipped)} unsupported: {'; '.join(skipped)}" if skipped else ""
    return PassResult("match_sdpa_attention", matched, detail)
