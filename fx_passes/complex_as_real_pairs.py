"""complex_as_real_pairs: complex tensors become real ones with a trailing (real, imaginary) pair, so that Inductor,
which has no complex code generation, fuses what it otherwise runs as ATen kernels of their own.

    z = view_as_complex(x); y = view_as_real(z * f)          # f = polar(1, angle): complex RoPE
    ->
    y = stack(x0 c - x1 s, x0 s + x1 c, -1)                  # (c, s) = (cos angle, sin angle), x0 = x[..., 0]

DeepSeek-V2's attention (transformers) and Meta's reference Llama rotate q and k this way: two complex
multiplications a layer, each an eager kernel between two of Inductor's (session 14's DeepSeek-V2-Lite profile:
54 such kernels a decode step). A pair is a trailing dimension of 2, so the leading dimensions keep their sizes and
strides, every view and index op over them stays the same op, and dimension arguments count from the front as
before (a negative one moves one further left). Sites: the complex results turned back to real (`view_as_real`).

Only the ops in REAL_PAIRS are rewritten; a graph with any other complex op (or a complex input, or output) is left
whole, the log naming the op: it still runs, as ATen's complex kernels.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

log = logging.getLogger("compiled_llm.passes")
aten = torch.ops.aten
COMPONENT = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _complex(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def _pair_dim(dim: int) -> int:
    """A dimension of a complex tensor as one of its real pairs (which have one more, last)."""
    return dim if dim >= 0 else dim - 1


def _parts(graph, pairs: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    return tuple(insert_call(graph, aten.select.int, (pairs, -1, i)) for i in (0, 1))


def _stack(graph, real: torch.fx.Node, imag: torch.fx.Node) -> torch.fx.Node:
    return insert_call(graph, aten.stack.default, ([real, imag], -1))


def _times(graph, a: torch.fx.Node, b: torch.fx.Node, c, d) -> torch.fx.Node:
    """(a + bi)(c + di) from a's and b's nodes and c's and d's (nodes or numbers)."""
    mul, sub, add = aten.mul.Tensor, aten.sub.Tensor, aten.add.Tensor
    real = insert_call(graph, sub, (insert_call(graph, mul, (a, c)), insert_call(graph, mul, (b, d))))
    imag = insert_call(graph, add, (insert_call(graph, mul, (a, d)), insert_call(graph, mul, (b, c))))
    return _stack(graph, real, imag)


def _mul(graph, node, pairs):
    x, y = node.args
    if not _complex(x):
        x, y = y, x
    if _complex(y):  # complex times complex
        return _times(graph, *_parts(graph, pairs[x]), *_parts(graph, pairs[y]))
    if isinstance(y, complex):
        return _times(graph, *_parts(graph, pairs[x]), y.real, y.imag)
    if isinstance(y, torch.fx.Node):  # a real tensor scales both parts
        y = insert_call(graph, aten.unsqueeze.default, (y, -1))
    return insert_call(graph, aten.mul.Tensor, (pairs[x], y))


def _add_or_sub(graph, node, pairs):
    return insert_call(graph, node.target, (pairs[node.args[0]], pairs[node.args[1]]))


def _polar(graph, node, pairs):
    magnitude, angle = node.args
    cos, sin = (insert_call(graph, fn, (angle,)) for fn in (aten.cos.default, aten.sin.default))
    return _stack(graph, *(insert_call(graph, aten.mul.Tensor, (magnitude, part)) for part in (cos, sin)))


def _cast(graph, node, pairs):
    """aten.to / _to_copy into a complex dtype: into its component dtype (a device move stays as it is)."""

    def component(a):
        return COMPONENT.get(a, a) if isinstance(a, torch.dtype) else a

    args = [pairs[node.args[0]], *map(component, node.args[1:])]
    return insert_call(graph, node.target, tuple(args), {k: component(v) for k, v in node.kwargs.items()})


def _same_op(graph, node, pairs, dims=(), shape=None):
    """The op over the pairs: argument positions `dims` are dimensions (moved left when negative), `shape` the
    position of a size list (a pair appended)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    args[0] = pairs[args[0]]
    for i in dims:
        if i < len(args):
            args[i] = _pair_dim(args[i])
    for name in ("dim", "dim0", "dim1"):
        if name in kwargs:
            kwargs[name] = _pair_dim(kwargs[name])
    if shape is not None:
        args[shape] = [*args[shape], 2]
    return insert_call(graph, node.target, tuple(args), kwargs)


def _permute(graph, node, pairs):
    order = [_pair_dim(d) for d in node.args[1]]
    return insert_call(graph, aten.permute.default, (pairs[node.args[0]], [*order, len(order)]))


# Each complex op's rewrite over its complex inputs' pairs (`pairs`: complex node -> its pairs), inserted before it;
# _not_covered says which uses of them it covers.
REAL_PAIRS = {
    aten.view_as_complex.default: lambda graph, node, pairs: node.args[0],
    aten.polar.default: _polar,
    aten.mul.Tensor: _mul,
    aten.add.Tensor: _add_or_sub,
    aten.sub.Tensor: _add_or_sub,
    aten.to.dtype_layout: _cast,
    aten.to.dtype: _cast,
    aten.to.device: _cast,
    aten._to_copy.default: _cast,
    aten.clone.default: _same_op,
    aten.alias.default: _same_op,
    aten.unsqueeze.default: lambda g, n, p: _same_op(g, n, p, dims=(1,)),
    aten.index_select.default: lambda g, n, p: _same_op(g, n, p, dims=(1,)),
    aten.slice.Tensor: lambda g, n, p: _same_op(g, n, p, dims=(1,)),
    aten.select.int: lambda g, n, p: _same_op(g, n, p, dims=(1,)),
    aten.transpose.int: lambda g, n, p: _same_op(g, n, p, dims=(1, 2)),
    aten.index.Tensor: _same_op,  # indices over the leading dimensions
    aten.view.default: lambda g, n, p: _same_op(g, n, p, shape=1),
    aten.reshape.default: lambda g, n, p: _same_op(g, n, p, shape=1),
    aten._unsafe_view.default: lambda g, n, p: _same_op(g, n, p, shape=1),
    aten.expand.default: lambda g, n, p: _same_op(g, n, p, shape=1),
    aten.permute.default: _permute,
}


# Ops whose complex argument must be the first, the others plain (a dimension, a size, indices, a dtype).
_FIRST_COMPLEX = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.polar.default, aten.view_as_complex.default}


def _not_covered(complex_nodes: list[torch.fx.Node]) -> str | None:
    """Why the graph's complex ops cannot all be rewritten, or None."""
    for node in complex_nodes:
        name = f"{node.op} {getattr(node.target, '__name__', node.target)} ({node.name})"
        for user in node.users:
            if not _complex(user) and user.target is not aten.view_as_real.default:
                return f"{user.op} {getattr(user.target, '__name__', user.target)} reading complex {node.name}"
        if node.op == "get_attr":
            continue
        if node.op != "call_function" or node.target not in REAL_PAIRS:
            return name
        inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if node.target in (aten.add.Tensor, aten.sub.Tensor):
            if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or not all(map(_complex, node.args)):
                return f"{name} other than complex + complex"
        elif node.target not in _FIRST_COMPLEX and any(_complex(a) for a in inputs[1:]):
            return f"{name} with a complex argument past its first"
        if node.target in (aten.polar.default, aten.view_as_complex.default) and any(map(_complex, inputs)):
            return f"{name} of a complex tensor"
    return None


@register_pass("complex_as_real_pairs")
def complex_as_real_pairs(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    complex_nodes = [n for n in graph.nodes if _complex(n)]
    if not complex_nodes:
        return PassResult("complex_as_real_pairs", 0)
    why = _not_covered(complex_nodes)
    if why is not None:
        log.info("complex_as_real_pairs: left the graph's complex ops as they are: %s is not covered", why)
        return PassResult("complex_as_real_pairs", 0, f"kept complex: {why} is not covered")
    pairs: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in complex_nodes:
        if node.op == "get_attr":  # a complex buffer (a RoPE table) is read through a real view of it
            with graph.inserting_after(node):
                pairs[node] = insert_call(graph, aten.view_as_real.default, (node,))
        else:
            with graph.inserting_before(node):
                pairs[node] = REAL_PAIRS[node.target](graph, node, pairs)
    made = set(pairs.values())
    reals = [u for n in complex_nodes for u in n.users if u.target is aten.view_as_real.default and u not in made]
    for real in reals:
        real.replace_all_uses_with(pairs[real.args[0]])
    for node in [*reals, *reversed(complex_nodes)]:  # users before what they read
        if node.op != "get_attr":
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    detail = f"{len(complex_nodes)} complex ops -> real pairs, {len(reals)} results"
    return PassResult("complex_as_real_pairs", len(reals), detail)
