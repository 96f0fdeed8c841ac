"""token_major_attention_inputs: compute attention's q, k, v in the token-major layout the op takes.

    t = transpose(view(x, [1, T, H, D]), 1, 2)            # HF's head-major [1, H, T, D]
    y = t * cos + rotate_half(t) * sin                    # RoPE; cos, sin: [1, 1, T, D]
    attention(transpose(select(y, 0, 0), 0, 1), ...)      # back to token-major [T, H, D]
    ->
    y = v * transpose(cos, 1, 2) + rotate_half(v) * transpose(sin, 1, 2)     # v = view(x, [1, T, H, D])
    attention(select(y, 0, 0), ...)

Elementwise math commutes with the transpose, so it is rebuilt on the untransposed tensor (and so do slices, cats and
chunks along a dimension, which moves with it). Inductor then
writes RoPE's output straight in the layout attention reads (and passes v as a view), instead of a
head-major buffer and a copy per input per layer.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from fx_passes.match_sdpa_attention import CANONICAL_ATTENTION
from fx_passes.node_match import calls, is_call
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten

ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.to.dtype, aten._to_copy.default, aten.clone.default,
}  # fmt: skip
ALONG_DIM = {aten.slice.Tensor, aten.cat.default}  # their dimension argument is args[1]
SPLITS = {aten.chunk.default, aten.split.Tensor}  # (x, chunks or size, dim=0), read through getitem (GPT-OSS's RoPE)


def _rank(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _is_call(node, target, *args) -> bool:
    return is_call(node, target) and tuple(node.args[1:]) == args


class _SwapHeadsAndTokens:
    """Maps a [1, H, T, D] node to an equal [1, T, H, D] one, rebuilding elementwise math so that the
    transposes HF put in front of it drop out; `found` counts those."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.done: dict[torch.fx.Node, torch.fx.Node] = {}  # shared by every layer: one view of cos, of sin
        self.found = 0

    def __call__(self, node: torch.fx.Node) -> torch.fx.Node:
        if node not in self.done:
            self.done[node] = self._swap(node)
        return self.done[node]

    def _transposed(self, node: torch.fx.Node) -> torch.fx.Node:
        with self.graph.inserting_after(node):
            return insert_call(self.graph, aten.transpose.int, (node, 1, 2))

    def _swap(self, node: torch.fx.Node) -> torch.fx.Node:
        if _is_call(node, aten.transpose.int, 1, 2) or _is_call(node, aten.transpose.int, 2, 1):
            self.found += 1
            return node.args[0]
        if is_call(node, operator.getitem) and node.args[0].target in SPLITS and _rank(node.args[0].args[0]) == 4:
            parts = node.args[0]
            if parts not in self.done:  # one swapped split for all its pieces
                dim = (parts.args[2] if len(parts.args) > 2 else 0) % 4
                args = (self(parts.args[0]), parts.args[1], {1: 2, 2: 1}.get(dim, dim))
                with self.graph.inserting_after(node):
                    self.done[parts] = insert_call(self.graph, parts.target, args)
            with self.graph.inserting_after(self.done[parts]):
                return insert_call(self.graph, operator.getitem, (self.done[parts], node.args[1]))
        if node.op != "call_function" or (node.target not in ELEMENTWISE and node.target not in ALONG_DIM):
            return self._transposed(node)
        if node.target is aten.cat.default:
            inputs = node.args[0]
            if any(_rank(x) != 4 for x in inputs):
                return self._transposed(node)
            args = [[self(x) for x in inputs], *node.args[1:]]
        else:
            args = []
            for arg in node.args:
                rank = _rank(arg)
                if rank == 4:
                    args.append(self(arg))
                elif rank is None or rank <= 1:  # scalars and [D] broadcast the same either way
                    args.append(arg)
                else:
                    return self._transposed(node)
        if node.target in ALONG_DIM:
            dim = args[1] % 4
            args[1] = {1: 2, 2: 1}.get(dim, dim)
        with self.graph.inserting_after(node):
            return insert_call(self.graph, node.target, tuple(args), dict(node.kwargs))


@register_pass("token_major_attention_inputs")
def token_major_attention_inputs(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    rewritten = 0
    swap = _SwapHeadsAndTokens(graph)
    for node in calls(graph, CANONICAL_ATTENTION):
        args = list(node.args)
        for i in range(3):  # q, k, v
            if i == 2 and node.args[2] is node.args[1]:  # values that are the keys stay one node (one cache plane)
                args[2] = args[1]
                continue
            if not _is_call(args[i], aten.transpose.int, 0, 1) or not _is_call(args[i].args[0], aten.select.int, 0, 0):
                continue
            head_major = args[i].args[0].args[0]
            if _rank(head_major) != 4:
                continue
            found = swap.found
            token_major = swap(head_major)
            if swap.found == found:
                continue  # nothing to gain: the math is not downstream of HF's transpose
            with graph.inserting_before(node):
                args[i] = insert_call(graph, aten.select.int, (token_major, 0, 0))
            rewritten += 1
        node.args = tuple(args)
    graph.eliminate_dead_code()
    return PassResult("token_major_attention_inputs", rewritten)
