"""module_kv_cache: a module's own KV cache gives way to the paged one.

gpt-fast's `KVCache.update`, written at the positions:

    k_all = aten.index_put_(k_cache, [None, None, positions], k[1,Hkv,T,D])     # the module's cache write
    o = aten.sdpa(q, repeat_interleave(k_all, n, 1), repeat_interleave(v_all, n, 1), attn_mask=mask)
    ->
    o = aten.sdpa(q, k, v, is_causal=True, enable_gqa=True)     # then match_sdpa_attention pages it

Meta's reference Llama, written and read as slices at start_pos (captured at 0, see forward_signature):

    aten.copy_(slice(slice(cache_k, 0, 0, 1), 1, 0, T), k)      # cache_k[:bsz, start_pos:start_pos+T] = xk
    keys = slice(slice(cache_k, 0, None, 1), 1, None, T)        # cache_k[:bsz, :start_pos+T]
    ->
    keys = k                                                    # the attention over them is matched later

The module writes this step's keys at their positions into a buffer and attends over the whole buffer
with a mask that lets position p see cache rows <= p; the paged cache holds each sequence's keys and the
attention op attends causally over them, which is the same thing when the mask is provably that one
(causal_mask.py, evaluated at positions 0..T-1). The buffer writes go: the module's cache is not used.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx

from fx_passes.causal_mask import causal_mask_problem, user_line
from fx_passes.match_sdpa_attention import SDPA, sdpa_arguments
from fx_passes.node_match import calls, is_call, slice_arguments, sym_expr, through_casts
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


def _slice_region(node) -> tuple[torch.fx.Node, tuple] | None:
    """(the module attribute, the region as ((start, end) per dim)) if `node` is a slice, or slices, of a
    get_attr; None otherwise."""
    slices = []
    while is_call(node, aten.slice.Tensor):
        slices.append(node)
        node = node.args[0]
    node = through_casts(node)
    if not slices or not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    shape = node.meta["val"].shape
    region = [(sympy.Integer(0), sympy.Integer(int(size))) for size in shape]
    for sliced in reversed(slices):
        dim, start, end, step = slice_arguments(sliced)
        if step != 1:
            return None
        dim %= len(shape)
        base_start, base_end = region[dim]
        start = base_start + sym_expr(0 if start is None else start)
        end = base_end if end is None else sympy.Min(base_end, base_start + sym_expr(end))
        region[dim] = (start, end)
    return node, tuple(region)


def _same_region(a: tuple, b: tuple, shape) -> bool:
    def bounded(expr, size):  # a slice's end clamps to the size; the token count is below any cache length
        return sympy.simplify(sympy.Min(expr, size) if not isinstance(expr, sympy.Integer) else expr)

    return all(
        sympy.simplify(sa - sb) == 0 and sympy.simplify(bounded(ea, size) - bounded(eb, size)) == 0
        for (sa, ea), (sb, eb), size in zip(a, b, shape)
    )


def _written_in_place(node: torch.fx.Node, seen: set | None = None) -> bool:
    """Whether an op writes `node`, or a view of it, in place."""
    seen = set() if seen is None else seen
    for user in node.users:
        if user in seen or user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
            continue
        seen.add(user)
        for arg, value in zip(user.target._schema.arguments, user.args):
            if value is node and arg.alias_info is not None:
                if arg.alias_info.is_write or _written_in_place(user, seen):
                    return True
    return False


def _sliced_cache_reads(gm: torch.fx.GraphModule) -> tuple[int, list[torch.fx.Node]]:
    """Replace each read of a module attribute's slice that this forward just wrote (copy_) with the values
    written; the writes returned. A read elsewhere in a written attribute is refused: with the first token
    at position 0 it can only be stale state."""
    graph = gm.graph
    written = {}  # attribute node -> (region, values, copy_ node)
    replaced, writes = 0, []
    for node in list(graph.nodes):
        if is_call(node, aten.copy_.default):
            found = _slice_region(node.args[0])
            if found is not None:
                written[found[0]] = (found[1], node.args[1], node)
                writes.append(node)
            continue
        if not is_call(node, aten.slice.Tensor) or any(is_call(u, aten.slice.Tensor) for u in node.users):
            continue
        found = _slice_region(node)
        if found is None or found[0] not in written or any(is_call(u, aten.copy_.default) for u in node.users):
            continue
        attribute, region = found
        region_written, values, _ = written[attribute]
        if not _same_region(region, region_written, attribute.meta["val"].shape):
            raise ValueError(
                f"{user_line(node)} reads the module's own cache ({attribute.target}) beyond the rows this step "
                "wrote: pass the positions as input_pos or start_pos, or drop the module's cache"
            )
        if values.meta["val"].shape != node.meta["val"].shape:
            raise ValueError(f"{user_line(node)}: the module's cache write broadcasts its values ({attribute.target})")
        if _written_in_place(values):  # the read would see the values as they are then, the cache as they were
            raise ValueError(
                f"{user_line(node)} reads the module's own cache ({attribute.target}) whose values the forward "
                "changes in place after writing them: copy them before changing them"
            )
        new = values
        if values.meta["val"].dtype != node.meta["val"].dtype:  # copy_ casts to the cache's dtype
            with graph.inserting_before(node):
                new = insert_call(graph, aten.to.dtype, (values, node.meta["val"].dtype))
        node.replace_all_uses_with(new)
        replaced += 1
    return replaced, writes


@register_pass("module_kv_cache")
def module_kv_cache(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    sliced, writes = _sliced_cache_reads(gm)
    replaced = 0
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
    written, replaced_caches = set(gm.meta.get("written_state", ())), set()  # attribute names
    for write in writes:
        for user in list(write.users):  # the repeats, now unused
            if not user.users:
                graph.erase_node(user)
        if not write.users:
            target = write.args[0]
            while target.op != "get_attr":  # through the slices and casts of a sliced write
                target = target.args[0]
            replaced_caches.add(target.target)
            graph.erase_node(write)
    graph.eliminate_dead_code()
    stale = [n for n in graph.nodes if n.op == "get_attr" and n.target in replaced_caches]
    if stale:  # its writes are gone, so what is still read of it would be stale
        lines = "; ".join(user_line(user) for node in stale for user in node.users)
        raise ValueError(
            f"the module reads its own KV cache {stale[0].target} other than through the attention the paged cache "
            f"replaces ({lines}): give the module a forward without its cache (positions as input_pos or start_pos)"
        )
    gm.meta["written_state"] = sorted(written - replaced_caches)
    gm.meta["replaced_caches"] = sorted(replaced_caches)
    gm.recompile()
    detail = ", ".join(part for part in (f"{replaced} attention calls over index_put caches" if replaced else "",
                                         f"{sliced} sliced cache reads" if sliced else "") if part)  # fmt: skip
    return PassResult("module_kv_cache", replaced + sliced, detail)
