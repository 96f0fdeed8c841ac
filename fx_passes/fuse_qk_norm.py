"""fuse_qk_norm: the per-head RMSNorms of one attention layer's queries and keys (Qwen3's, Qwen3-MoE's q_norm and
k_norm) become one op, with the RoPE after them where it is HF's: one kernel launch instead of three.

    qv = as_strided(qkv, [1, T, Hq, D], ...)          (or view(linear(x, W_q), [1, T, Hq, D]); k's likewise)
    qn = compiled_llm.rms_norm(qv, w_q, eps, backend)                 (fuse_rms_norm's ops)
    kn = compiled_llm.rms_norm(kv, w_k, eps, backend)
    attention(select(rope(qn), 0, 0), select(rope(kn), 0, 0), v, ...)
    ->
    qk = compiled_llm.qk_rms_norm(qv, kv, w_q, w_k, eps, backend, cos, sin)
    attention(select(qk[0], 0, 0), select(qk[1], 0, 0), v, ...)

where rope(y) = y * C + cat([-y[..., D/2:], y[..., :D/2]], -1) * S with C, S [1, T, 1, D] (views of cos and sin
[T, D]) for both, and y its only reader; otherwise RoPE stays Inductor's (qk = qk_rms_norm(qv, kv, w_q, w_k, eps,
backend); qn = qk[0]; kn = qk[1]).

A pair is two norms that the canonical attention op of one layer reads as its q and as its k, each through
elementwise and layout ops only (RoPE, the selects and transposes around attention), each over a per-head view
shaped as that input's [heads, head_dim]; both views of one linear output (a fused qkv) or of two linears of one
input, with the same eps, backend and dtypes. Anything else stays as it is. Exact: the op computes each norm as
`rms_norm` does, and RoPE in float32 from the norm's rounded output, rounded once, as Inductor does. It matches
`rms_norm` ops, so the backend is fuse_rms_norm's (`CompileConfig.norm_backend`): Gemma's (1 + w) norm, which
fuse_rms_norm leaves to Inductor, is left alone here too.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import custom_ops.rms_norm  # noqa: F401  (registers the ops)
from fx_passes.kernel_backend import resolve_triton_backend
from fx_passes.match_sdpa_attention import CANONICAL_ATTENTION
from fx_passes.node_match import calls, is_call, sym_expr
from fx_passes.node_meta import insert_call, insert_outputs
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
RMS_NORM = torch.ops.compiled_llm.rms_norm.default

# What may lie between a norm and attention: RoPE's arithmetic, its half-splits, and layout changes.
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.to.dtype,
                aten._to_copy.default, aten.clone.default, aten.cat.default, aten.chunk.default, aten.split.Tensor}  # fmt: skip
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.as_strided.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.slice.Tensor, aten.transpose.int,
          aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, operator.getitem}  # fmt: skip
_LINEARS = (aten.linear.default, torch.ops.compiled_llm.linear.default)
FUSE_ROPE = True  # False: RoPE stays Inductor's (for A/B runs: benchmarks/cli_with_settings.py)


def _norms_read_by(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The rms_norm ops `node` reads through elementwise and layout ops only."""
    found, seen, todo = set(), set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, torch.fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target is RMS_NORM:
            found.add(n)
        elif n.target in _ELEMENTWISE or n.target in _VIEWS:
            todo.extend(n.all_input_nodes)
    return found


def _same_sizes(a, b) -> bool:
    """Whether two sizes are the same expressions (the token count's symbol too), asked without a guard."""
    return len(a) == len(b) and all(sym_expr(x) == sym_expr(y) for x, y in zip(a, b, strict=True))


def _source(node: torch.fx.Node) -> tuple:
    """What a per-head view is a view of: the node, or ("linear", input) for a linear (q_proj and k_proj of one x)."""
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return ("linear", node.args[0]) if node.op == "call_function" and node.target in _LINEARS else (node,)


def _norm_of(attention_input, norms: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The one norm in `norms` over a get_attr weight and a per-head view shaped as `attention_input`'s heads."""
    if len(norms) != 1:
        return None
    (norm,) = norms
    x, weight = norm.args[:2]
    heads = attention_input.meta["val"].shape[-2:]
    if weight.op != "get_attr" or x.meta["val"].dim() < 3 or not _same_sizes(x.meta["val"].shape[-2:], heads):
        return None
    return norm


def _pair(attention: torch.fx.Node, backend: str) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(q's norm, k's norm) of one attention op, if they pair (the module docstring)."""
    q_norm = _norm_of(attention.args[0], _norms_read_by(attention.args[0]))
    k_norm = _norm_of(attention.args[1], _norms_read_by(attention.args[1]))
    if q_norm is None or k_norm is None or q_norm is k_norm:
        return None
    (q, w_q, eps, q_backend), (k, w_k, k_eps, k_backend) = q_norm.args, k_norm.args
    qv, kv = q.meta["val"], k.meta["val"]
    if (eps, q_backend) != (k_eps, k_backend) or q_backend != backend or _source(q) != _source(k):
        return None
    if qv.dtype != kv.dtype or w_q.meta["val"].dtype != w_k.meta["val"].dtype:
        return None
    if not (_same_sizes(qv.shape[:-2], kv.shape[:-2]) and _same_sizes(qv.shape[-1:], kv.shape[-1:])):
        return None
    return q_norm, k_norm


def _half_slice(node, source: torch.fx.Node, d: int) -> str | None:
    """"first" or "second" where `node` is slice(source, last dim, ...) of that half of d columns, else None."""
    if not (is_call(node, aten.slice.Tensor) and node.args[0] is source and len(node.users) == 1):
        return None
    dim, start, end, step = (*node.args[1:], *(0, None, None, 1)[len(node.args) - 1 :])
    if dim not in (-1, 3) or step != 1 or not isinstance(start, int) or not isinstance(end, int):
        return None
    return {(0, d // 2): "first", (d // 2, d): "second"}.get((start, min(end, d)))


def _times(node, factor_of) -> tuple | None:
    """(x, factor) where `node` is mul(x, factor) or mul(factor, x) and factor_of(x) holds for x, else None."""
    if not (is_call(node, aten.mul.Tensor) and len(node.users) == 1 and not node.kwargs):
        return None
    for x, factor in (node.args, node.args[::-1]):
        if isinstance(factor, torch.fx.Node) and factor_of(x):
            return x, factor
    return None


def _rope_of(norm: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """(add, C, S) where norm's readers are exactly HF's RoPE of it (the module docstring) and C, S are [1, T, 1, D]
    tables of its dtype; None otherwise."""
    val = norm.meta["val"]
    if val.dim() != 4 or not _same_sizes(val.shape[:1], (1,)) or not isinstance(val.shape[-1], int):
        return None
    d = val.shape[-1]
    halves = {_half_slice(u, norm, d): u for u in norm.users if is_call(u, aten.slice.Tensor)}
    muls = [u for u in norm.users if is_call(u, aten.mul.Tensor)]
    if len(norm.users) != 3 or set(halves) != {"first", "second"} or len(muls) != 1 or d % 2:
        return None
    negated = next(iter(halves["second"].users))
    if not (is_call(negated, aten.neg.default) and len(negated.users) == 1):
        return None
    cat = next(iter(negated.users))
    if not (is_call(cat, aten.cat.default) and list(cat.args[0]) == [negated, halves["first"]]):
        return None
    if (cat.args[1] if len(cat.args) > 1 else 0) not in (-1, 3) or len(cat.users) != 1:
        return None
    by_cos = _times(muls[0], lambda x: x is norm)
    by_sin = _times(next(iter(cat.users)), lambda x: x is cat)
    if by_cos is None or by_sin is None:
        return None
    add = next(iter(muls[0].users))
    if not (is_call(add, aten.add.Tensor) and not add.kwargs and set(add.args) == {muls[0], next(iter(cat.users))}):
        return None
    tables = by_cos[1], by_sin[1]
    for table in tables:
        t = table.meta.get("val")
        if not (isinstance(t, torch.Tensor) and t.dtype == val.dtype and t.dim() == 4
                and _same_sizes(t.shape, (1, val.shape[1], 1, d))):  # fmt: skip
            return None
    if add.meta["val"].dtype != val.dtype:
        return None
    return add, *tables


def _token_rows(graph: torch.fx.Graph, table: torch.fx.Node, made: dict) -> torch.fx.Node:
    """A [1, T, 1, D] table as [T, D]: one view a table, which every layer reads (it stands before the first)."""
    if table not in made:
        rows = insert_call(graph, aten.select.int, (table, 2, 0))
        made[table] = insert_call(graph, aten.select.int, (rows, 0, 0))
    return made[table]


def _after(start: torch.fx.Node, before: dict[torch.fx.Node, int], limit: int) -> list[torch.fx.Node] | None:
    """The nodes that read `start`'s output (transitively) and stand before position `limit`, in graph order
    (they move after the fused op); None if one of them is at `limit` (an input of the fused op reads `start`)."""
    found, todo = set(), list(start.users)
    while todo:
        n = todo.pop()
        if n in found or before[n] > limit:
            continue
        if before[n] == limit:
            return None
        found.add(n)
        todo.extend(n.users)
    return sorted(found, key=before.__getitem__)


@register_pass("fuse_qk_norm")
def fuse_qk_norm(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    norms = calls(graph, RMS_NORM)
    if not norms:
        return PassResult("fuse_qk_norm", 0)
    backend, why = resolve_triton_backend("norm_backend", config.norm_backend, norms[0].args[0].meta["val"].device.type)
    if backend == "torch":
        return PassResult("fuse_qk_norm", 0, f"norms left to Inductor ({why})")
    fused = with_rope = 0
    table_rows = {}  # _token_rows' views, shared by the layers
    for attention in calls(graph, CANONICAL_ATTENTION):
        pair = _pair(attention, backend)
        if pair is None:
            continue
        before = {n: i for i, n in enumerate(graph.nodes)}  # afresh: the sites before moved and added nodes
        q_norm, k_norm = pair
        (q, w_q, eps, _), (k, w_k, _, _) = q_norm.args, k_norm.args
        ropes = (_rope_of(q_norm), _rope_of(k_norm)) if FUSE_ROPE else (None, None)
        rope = None not in ropes and ropes[0][1:] == ropes[1][1:]  # one cos and sin for both
        tables = ropes[0][1:] if rope else ()
        last = max(q, k, *tables, key=before.__getitem__)  # the fused op goes right after its later input
        moved = [_after(norm, before, before[last]) for norm in pair]
        if None in moved:  # one norm's output feeds the other's input: not a pair after all
            continue
        with graph.inserting_before(last.next):
            weights = []
            for w in (w_q, w_k):  # nodes of their own, which the graph may define only further down
                weights.append(graph.get_attr(w.target))
                weights[-1].meta["val"] = w.meta["val"]
            rows = [_token_rows(graph, table, table_rows) for table in tables]
            call = insert_call(graph, torch.ops.compiled_llm.qk_rms_norm.default, (q, k, *weights, eps, backend, *rows),
                               val=tuple((found[0] if rope else norm).meta["val"]
                                         for norm, found in zip(pair, ropes, strict=True)))  # fmt: skip
            outputs = insert_outputs(graph, call)
        anchor = outputs[-1]
        for node in sorted({*moved[0], *moved[1]}, key=before.__getitem__):  # what read a norm before `last`
            anchor.append(node)
            anchor = node
        for norm, found, output in zip(pair, ropes, outputs, strict=True):
            (found[0] if rope else norm).replace_all_uses_with(output)  # RoPE's add, or the norm
        fused += 1
        with_rope += rope
    graph.eliminate_dead_code()
    note = f"{fused} q/k norm pairs -> {backend}, {with_rope} with their RoPE" if fused else ""
    return PassResult("fuse_qk_norm", fused, note)
