"""runtime_positions: positions a module derives from the token count become the runtime's positions.

    pos = aten.arange(start, start + T)      # T: the number of tokens (nanoGPT: torch.arange(0, t))
    ->
    pos = position_ids + start               # cast to the arange's dtype

    e = aten.slice(table, dim, 0, T)         # a table's first T rows (minGPT: pos_emb[:, :t, :])
    ->
    e = aten.index_select(table, dim, position_ids)

A module without a position argument computes position t for its t-th input token. Over the runtime's flat
tokens (several sequences, each continuing from its cache) the t-th token is not at position t; the
runtime's `position_ids` say where each one is. The self-check (compiled_llm/verify.py) holds the result
against the module's own forward, so an arange used otherwise (a mask, say) fails loudly, not silently.

Also records `gm.meta["max_positions"]`: the rows of the smallest table indexed by positions (a learned
position embedding, a precomputed RoPE table), past which a sequence cannot go.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx

from fx_passes.node_match import slice_arguments, sym_expr, through_casts
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
# Ops a position index passes through unchanged in meaning on its way to a table lookup.
_POSITION_VIEWS = (aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim,
                   aten.select.int, aten.to.dtype, aten._to_copy.default, aten.alias.default)  # fmt: skip


def _arange_range(node: torch.fx.Node) -> tuple:
    """(start, end, step) of an arange node, as written."""
    args = list(node.args)
    if node.target is aten.arange.default:
        return 0, args[0], 1
    start, end = args[0], args[1]
    step = args[2] if node.target is aten.arange.start_step else node.kwargs.get("step", 1)
    return start, end, step


def _table_rows(node: torch.fx.Node, seen: set) -> list[int]:
    """Rows of the tables that positions flowing out of `node` index (embedding weights, indexed buffers)."""
    rows = []
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        if user.target is aten.embedding.default and user.args[1] is node:
            rows.append(int(user.args[0].meta["val"].shape[0]))
        elif user.target is aten.index.Tensor and user.args[1] and user.args[1][0] is node:
            rows.append(int(user.args[0].meta["val"].shape[0]))
        elif user.target is aten.index_select.default and user.args[2] is node:
            rows.append(int(user.args[0].meta["val"].shape[user.args[1]]))
        elif user.target in _POSITION_VIEWS:
            rows += _table_rows(user, seen)
    return rows


def _table_prefix(node: torch.fx.Node, tokens, written: set[str]) -> int | None:
    """The dimension along which `node` takes a table's first T rows (`table[:, :t]`, minGPT's
    `pos_emb[:, :t, :]`), T being the step's token count; None if it does not. A tensor the forward writes
    is a cache, not a table (Meta's `cache_k[:bsz, start_pos:start_pos+T] = xk`: module_kv_cache's)."""
    table = through_casts(node.args[0]) if node.target is aten.slice.Tensor else None  # Meta's freqs_cis.to(device)
    if table is None or table.op != "get_attr" or table.target in written:
        return None
    dim, start, end, step = slice_arguments(node)
    if start not in (0, None) or step != 1 or sym_expr(end) is None or sympy.simplify(sym_expr(end) - tokens) != 0:
        return None
    return dim % node.args[0].meta["val"].dim()


@register_pass("runtime_positions")
def runtime_positions(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    positions = placeholders["position_ids"]
    tokens = sym_expr(placeholders["input_ids"].meta["val"].shape[0])
    replaced, skipped = 0, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ARANGES:
            continue
        start, end, step = _arange_range(node)
        start_e, end_e, step_e = sym_expr(start), sym_expr(end), sym_expr(step)
        if None in (start_e, end_e, step_e) or not isinstance(start, int) or step_e != 1:
            continue
        if sympy.simplify(end_e - start_e - tokens) != 0:
            if tokens in end_e.free_symbols:
                skipped.append(f"{node.name}: arange({start}, {end_e}, {step}) over the tokens but not one per token")
            continue
        dtype = node.kwargs.get("dtype") or torch.int64
        with graph.inserting_before(node):
            new = positions if start == 0 else insert_call(graph, aten.add.Tensor, (positions, start))
            if dtype != torch.int64:
                new = insert_call(graph, aten.to.dtype, (new, dtype))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    written = set(gm.meta.get("written_state", ()))
    for node in list(graph.nodes):  # a table's first T rows: the rows of the tokens' positions
        dim = _table_prefix(node, tokens, written) if node.op == "call_function" else None
        if dim is None:
            continue
        with graph.inserting_before(node):
            new = insert_call(graph, aten.index_select.default, (node.args[0], dim, positions))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced += 1
    rows = _table_rows(positions, set())
    if rows:
        gm.meta["max_positions"] = min(rows)
    graph.lint()
    gm.recompile()
    detail = f"tables of {min(rows)} positions" if rows else ""
    if skipped:
        detail += ("; " if detail else "") + f"left {'; '.join(skipped)}"
    return PassResult("runtime_positions", replaced, detail)
