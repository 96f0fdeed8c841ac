"""match_explicit_attention: attention written out (minGPT, Meta's reference Llama) becomes the canonical op.

    s = aten.matmul(q[1,H,T,D], aten.transpose(k[1,H,T,D], -2, -1))
    s = aten.mul(s, scale)                           (or div by 1/scale; or none: scale 1)
    s = aten.masked_fill(s, mask, -inf)              (or aten.add(s, additive_mask))
    o = aten.matmul(aten.softmax(s, -1), v[1,H,T,D]) (a dropout of p=0 or a cast around the softmax allowed)
    (k and v may repeat Hkv heads to H: repeat_interleave, or Meta's and HF's repeat_kv: unsqueeze, expand, reshape)
    ->
    o = compiled_llm.attention(q[0].T(0,1), k[0].T(0,1), v[0].T(0,1), layer, scale, 0, 0.0, None)[None].T(1,2)

Only a mask proven causal is accepted: the mask's subgraph (constants, buffers and the token count) is
evaluated for several token counts and compared with the causal mask of that size (causal_mask.py). A
mask built from anything else (the token ids, a padding mask) or not causal is refused, naming its line.
"""

from __future__ import annotations

import torch
import torch.fx

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from fx_passes.causal_mask import causal_mask_problem, user_line
from fx_passes.match_sdpa_attention import CANONICAL_ATTENTION
from fx_passes.node_match import calls
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
_PASS_THROUGH = (aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.alias.default)


def _through(node, targets=_PASS_THROUGH):
    """`node` with the pass-through ops in front of it skipped (a cast, a p=0 dropout)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets:
        if node.target is aten.dropout.default and node.args[1] != 0.0 and node.args[2]:
            break
        node = node.args[0]
    return node


def _unrepeated_heads(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """The key or value heads [1, Hkv, T, D] before GQA repeated them to the query heads (each kv head n times
    in a row), or `node` itself. Repeats: repeat_interleave over dim 1; unsqueeze, expand, reshape (repeat_kv)
    over the heads of [1, Hkv, T, D] or, before a transpose(1, 2), of [1, T, Hkv, D]."""
    if _is(node, aten.repeat_interleave.self_int) and list(node.args[2:3]) == [1]:
        return node.args[0]
    transposed = _is(node, aten.transpose.int) and sorted(node.args[1:]) == [1, 2]
    merged = node.args[0] if transposed else node
    heads = 2 if transposed else 1  # the axis of heads in `merged`'s layout
    if not (_is(merged, aten.reshape.default) or _is(merged, aten.view.default)):
        return node
    expanded = merged.args[0]
    if not _is(expanded, aten.expand.default) or not _is(expanded.args[0], aten.unsqueeze.default):
        return node
    unsqueezed = expanded.args[0]
    x = unsqueezed.args[0]
    shape = list(x.meta["val"].shape)
    if len(shape) != 4 or unsqueezed.args[1] % 5 != heads + 1:
        return node
    repeats = expanded.meta["val"].shape[heads + 1]
    wanted = [*shape[: heads + 1], repeats, *shape[heads + 1 :]]
    merged_shape = [*shape[:heads], shape[heads] * repeats, *shape[heads + 1 :]]
    if [str(d) for d in expanded.meta["val"].shape] != [str(d) for d in wanted] or [
        str(d) for d in merged.meta["val"].shape
    ] != [str(d) for d in merged_shape]:
        return node
    if not transposed:
        return x
    with graph.inserting_after(x):
        return insert_call(graph, aten.transpose.int, (x, 1, 2))


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


@register_pass("match_explicit_attention")
def match_explicit_attention(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    token_count = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "input_ids").meta["val"].shape[0]
    next_layer = 1 + max((n.args[3] for n in calls(graph, CANONICAL_ATTENTION)), default=-1)
    matched = 0
    for softmax in calls(graph, aten.softmax.int) + calls(graph, aten._softmax.default):
        if softmax.args[1] not in (-1, 3):
            continue
        out = next(iter(softmax.users), None)
        while out is not None and out.target in _PASS_THROUGH and len(out.users) == 1:
            out = next(iter(out.users))
        scores = _through(softmax.args[0])
        if out is None or not _is(out, aten.matmul.default) or _through(out.args[0]) is not softmax:
            continue
        mask, additive = None, False
        if _is(scores, aten.masked_fill.Scalar) and scores.args[2] == float("-inf"):
            scores, mask = scores.args[0], scores.args[1]
        elif _is(scores, aten.add.Tensor):
            scores, mask, additive = scores.args[0], scores.args[1], True
        where = user_line(softmax)
        if mask is None:
            raise ValueError(f"attention at {where} has no mask: only causal attention can be paged")
        scale, scaled = 1.0, _through(scores)
        if _is(scaled, aten.mul.Tensor) and isinstance(scaled.args[1], float):
            scale, scaled = scaled.args[1], scaled.args[0]
        elif _is(scaled, aten.div.Tensor) and isinstance(scaled.args[1], (int, float)):
            scale, scaled = 1.0 / scaled.args[1], scaled.args[0]
        if not _is(scaled, aten.matmul.default) or not _is(scaled.args[1], aten.transpose.int):
            continue
        q, key_t, v = scaled.args[0], scaled.args[1], out.args[1]
        if sorted(key_t.args[1:]) not in ([-2, -1], [2, 3]):
            continue
        k, v = _unrepeated_heads(graph, key_t.args[0]), _unrepeated_heads(graph, v)
        shapes = [x.meta["val"].shape for x in (q, k, v)]
        if any(len(s) != 4 or s[0] != 1 for s in shapes) or str(shapes[1][1]) != str(shapes[2][1]):
            continue  # not [1, heads, tokens, head_dim]: refused below
        if int(shapes[0][1]) % int(shapes[1][1]):
            continue
        problem = causal_mask_problem(gm, mask, "additive" if additive else "masked", gm.meta.get("max_positions"))
        if problem:
            raise ValueError(f"attention at {where}: {problem}; only causal attention can be paged")
        with graph.inserting_before(out):
            flat = [
                insert_call(graph, aten.transpose.int, (insert_call(graph, aten.select.int, (x, 0, 0)), 0, 1))
                for x in (q, k, v)
            ]  # each [T, H, D]
            new = insert_call(graph, CANONICAL_ATTENTION, (*flat, next_layer, float(scale), 0, 0.0, None))
            new = insert_call(graph, aten.transpose.int, (insert_call(graph, aten.unsqueeze.default, (new, 0)), 1, 2))
            if new.meta["val"].dtype != out.meta["val"].dtype:
                new = insert_call(graph, aten.to.dtype, (new, out.meta["val"].dtype))
        out.replace_all_uses_with(new)
        matched += 1
        next_layer += 1
    # A p=0 dropout counts as impure to the default rule (it draws random numbers when p > 0).
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() and n.target is not aten.dropout.default)
    gm.recompile()
    # A softmax over the step's tokens is attention (a router's is over its experts).
    softmaxes = calls(graph, aten.softmax.int) + calls(graph, aten._softmax.default)
    left = [n for n in softmaxes if str(n.meta["val"].shape[-1]) == str(token_count)]
    if left:
        lines = "; ".join(user_line(n) for n in left)
        raise ValueError(
            f"{len(left)} softmax over the tokens of a step left unrecognised as attention ({lines}): write attention "
            "as F.scaled_dot_product_attention(q, k, v, is_causal=True) or softmax(q @ k.T * scale + causal mask) @ v "
            "with as many key heads as query heads"
        )
    return PassResult("match_explicit_attention", matched)
