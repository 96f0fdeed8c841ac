"""module_kv_cache: a module's own KV cache (gpt-fast's `KVCache.update`) gives way to the paged one.

    k_all = aten.index_put_(k_cache, [None, None, positions], k[1,Hkv,T,D])     # the module's cache write
    o = aten.sdpa(q, repeat_interleave(k_all, n, 1), repeat_interleave(v_all, n, 1), attn_mask=mask)
    ->
    o = aten.sdpa(q, k, v, is_causal=True, enable_gqa=True)     # then match_sdpa_attention pages it

The module writes this step's keys at their positions into a buffer and attends over the whole buffer
with a mask that lets position p see cache rows <= p; the paged cache holds each sequence's keys and the
attention op attends causally over them, which is the same thing when the mask is provably that one
(causal_mask.py, evaluated at positions 0..T-1). The buffer writes go: the module's cache is not used.
"""

from __future__ import annotations

import torch
import torch.fx

from fx_passes.causal_mask import causal_mask_problem, user_line
from fx_passes.match_sdpa_attention import SDPA, sdpa_arguments
from fx_passes.node_match import calls, is_call
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
_CACHE_WRITES = (aten.index_put_.default, aten.index_put.default)


def _positions(node) -> bool:
    while is_call(node, aten.view.default) or is_call(node, aten.alias.default):
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.target == "position_ids"


def _cache_write(node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the write, the values written) if `node` is a module cache written at the positions (and repeated
    over query-head groups), else None."""
    if is_call(node, aten.repeat_interleave.self_int) and node.args[2:3] == (1,):
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _CACHE_WRITES):
        return None
    cache, indices, values = node.args[:3]
    if cache.op != "get_attr" or len(indices) != 3 or list(indices[:2]) != [None, None] or not _positions(indices[2]):
        return None
    # Advanced indexing puts the indexed dimension first, so export views the values without the batch
    # dimension: take the [1, heads, tokens, head_dim] tensor they were.
    while is_call(values, aten.view.default) and values.args[0].meta["val"].dim() == 4:
        values = values.args[0]
    shape = values.meta["val"].shape
    if len(shape) != 4 or shape[0] != 1:
        return None
    return node, values


@register_pass("module_kv_cache")
def module_kv_cache(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    replaced, writes = 0, []
    for sdpa in calls(graph, SDPA):
        args = sdpa_arguments(sdpa)
        key, value = _cache_write(args["key"]), _cache_write(args["value"])
        if key is None and value is None:
            continue
        where = user_line(sdpa)
        if key is None or value is None:
            raise ValueError(f"attention at {where} reads one of its keys and values from the module's cache only")
        mask = args.get("attn_mask")
        if mask is None or args.get("is_causal") or args.get("dropout_p", 0.0):
            raise ValueError(f"attention at {where} over the module's KV cache needs its causal mask (attn_mask)")
        kind = "attend" if mask.meta["val"].dtype == torch.bool else "additive"
        problem = causal_mask_problem(gm, mask, kind, gm.meta.get("max_positions"))
        if problem:
            raise ValueError(f"attention at {where} over the module's KV cache: {problem}; only causal attention can be paged")
        (k_write, k), (v_write, v) = key, value
        q = args["query"]
        gqa = int(q.meta["val"].shape[1]) != int(k.meta["val"].shape[1])
        with graph.inserting_before(sdpa):
            new = insert_call(graph, SDPA, (q, k, v), {"is_causal": True, "scale": args.get("scale"), "enable_gqa": gqa})
        sdpa.replace_all_uses_with(new)
        graph.erase_node(sdpa)
        writes += [k_write, v_write]
        replaced += 1
    written = set(gm.meta.get("written_state", ()))
    for write in writes:
        for user in list(write.users):  # the repeats, now unused
            if not user.users:
                graph.erase_node(user)
        if not write.users:
            written.discard(write.args[0].target)
            graph.erase_node(write)
    gm.meta["written_state"] = sorted(written)
    graph.eliminate_dead_code()
    gm.recompile()
    return PassResult("module_kv_cache", replaced)
