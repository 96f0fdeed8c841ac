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

Each op computes as ATen's does: in the result's dtype (operands cast to its component first), a real operand as
x + 0i (inf * 0 is NaN in a complex product), and each `view_as_real` result in the layout ATen gives it (the real ops
after it may view it). Only the ops in REAL_PAIRS are rewritten, complex64 and complex128 only; a graph with any other
complex op (or a complex input, or output), or a result it cannot lay out as ATen does, is left whole, the log naming
why: it still runs, as ATen's complex kernels.
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


def _cast_to(graph, value, dtype: torch.dtype):
    """A tensor node in `dtype` (cast where it is not), anything else as it is."""
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    if isinstance(val, torch.Tensor) and val.dtype != dtype:
        return insert_call(graph, aten._to_copy.default, (value,), {"dtype": dtype})
    return value


def _operand(graph, value, pairs, dtype: torch.dtype) -> tuple:
    """(real part, imaginary part) of an elementwise op's operand, in the result's component `dtype` as ATen computes
    (it promotes every operand to the result's dtype first): a complex node's pairs, a complex number's parts, and a
    real tensor, symbolic or number `x` as x + 0i (so that inf * 0 gives NaN as ATen's complex product does)."""
    if _complex(value):
        both = _cast_to(graph, pairs[value], dtype)
        return tuple(insert_call(graph, aten.select.int, (both, -1, i)) for i in (0, 1))
    if isinstance(value, complex):
        return value.real, value.imag
    return _cast_to(graph, value, dtype), 0.0


_PYTHON = {
    aten.mul.Tensor: lambda x, y: x * y,
    aten.add.Tensor: lambda x, y: x + y,
    aten.sub.Tensor: lambda x, y: x - y,
}


def _binary(graph, op, x, y):
    """op(x, y) for aten.mul/add/sub.Tensor, where either may be a number (these ops take a tensor first: a product
    or sum is the same either way round, x - y is rsub(y, x))."""
    if not isinstance(x, torch.fx.Node):
        if not isinstance(y, torch.fx.Node):
            return _PYTHON[op](x, y)
        return insert_call(graph, aten.rsub.Scalar, (y, x)) if op is aten.sub.Tensor else insert_call(graph, op, (y, x))
    return insert_call(graph, op, (x, y))


def _stack(graph, real, imag) -> torch.fx.Node:
    return insert_call(graph, aten.stack.default, ([real, imag], -1))


def _mul(graph, node, pairs):
    """(a + bi)(c + di) = (ac - bd) + (ad + bc)i, the operands in their order."""
    dtype = COMPONENT[node.meta["val"].dtype]
    (a, b), (c, d) = (_operand(graph, x, pairs, dtype) for x in node.args)
    mul, sub, add = aten.mul.Tensor, aten.sub.Tensor, aten.add.Tensor
    real = _binary(graph, sub, _binary(graph, mul, a, c), _binary(graph, mul, b, d))
    imag = _binary(graph, add, _binary(graph, mul, a, d), _binary(graph, mul, b, c))
    return _stack(graph, real, imag)


def _add_or_sub(graph, node, pairs):
    dtype = COMPONENT[node.meta["val"].dtype]
    (a, b), (c, d) = (_operand(graph, x, pairs, dtype) for x in node.args)
    return _stack(graph, *(_binary(graph, node.target, x, y) for x, y in ((a, c), (b, d))))


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


def _reshape(graph, node, pairs):
    return insert_call(graph, aten.reshape.default, (pairs[node.args[0]], [*node.args[1], 2]))


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
    # reshape, not view: the pairs of a complex value need not be laid out as ATen laid the value out (the graph is
    # functional: a copy where a view cannot be is the same values)
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.expand.default: lambda g, n, p: _same_op(g, n, p, shape=1),
    aten.permute.default: _permute,
}


_ELEMENTWISE = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor)
_MADE_FROM_REALS = (aten.polar.default, aten.view_as_complex.default)
_LAYOUTS = (None, torch.preserve_format, torch.contiguous_format)


def _not_covered(complex_nodes: list[torch.fx.Node]) -> str | None:
    """Why the graph's complex ops cannot all be rewritten, or None."""
    for node in complex_nodes:
        name = f"{node.op} {getattr(node.target, '__name__', node.target)} ({node.name})"
        if node.meta["val"].dtype not in (torch.complex64, torch.complex128):  # complex32: ATen sums in float32
            return f"{name} in {node.meta['val'].dtype}"
        for user in node.users:
            if not _complex(user) and user.target is not aten.view_as_real.default:
                return f"{user.op} {getattr(user.target, '__name__', user.target)} reading complex {node.name}"
        if node.op == "get_attr":
            continue
        if node.op != "call_function" or node.target not in REAL_PAIRS:
            return name
        inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if node.target in _ELEMENTWISE:
            if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
                return f"{name} with an alpha"
        elif node.target in _MADE_FROM_REALS:
            if any(map(_complex, inputs)):
                return f"{name} of a complex tensor"
        elif not _complex(node.args[0]) or any(_complex(a) for a in inputs[1:]):
            return f"{name} of other than one complex tensor, its first argument"
        if node.kwargs.get("memory_format") not in _LAYOUTS:
            return f"{name} into {node.kwargs['memory_format']}"
    return None


def _same_layout(real: torch.fx.Node, pairs: torch.fx.Node) -> bool:
    """Whether the pairs are the view_as_real result `real` as ATen lays it out, for the real ops after it (a view
    valid over one layout may not be over another): the same dtype, sizes and strides (but of a size-1 dimension)."""
    a, b = real.meta["val"], pairs.meta["val"]
    if a.dtype != b.dtype or [str(n) for n in a.shape] != [str(n) for n in b.shape]:
        return False
    return all(str(x) == str(y) for n, x, y in zip(a.shape, a.stride(), b.stride()) if str(n) != "1")


def _in_layout(graph, pairs: torch.fx.Node, like: torch.Tensor) -> torch.fx.Node:
    """The pairs copied into the dimension order of `like` (ATen's result: an elementwise op's output follows its
    inputs' order, where `stack` writes its own): permute to that order, make contiguous, permute back."""
    from torch._prims_common import compute_elementwise_output_logical_to_physical_perm

    order, _ = compute_elementwise_output_logical_to_physical_perm(like)
    back = sorted(range(len(order)), key=order.__getitem__)
    ordered = insert_call(graph, aten.permute.default, (pairs, order))
    copied = insert_call(graph, aten.clone.default, (ordered,), {"memory_format": torch.contiguous_format})
    return insert_call(graph, aten.permute.default, (copied, back))


def _results(graph, reals: list[torch.fx.Node], pairs: dict) -> tuple[dict, str | None]:
    """What replaces each view_as_real node: its complex input's pairs, in the layout ATen gave it; and why not, if
    some cannot be."""
    results = {}
    for real in reals:
        results[real] = pairs[real.args[0]]
        if _same_layout(real, results[real]):
            continue
        try:
            with graph.inserting_before(real):
                results[real] = _in_layout(graph, results[real], real.meta["val"])
        except Exception as error:  # noqa: BLE001  (an order it cannot decide over symbolic sizes: refused below)
            log.debug("complex_as_real_pairs: no layout for %s: %s", real.name, error)
        if not _same_layout(real, results[real]):
            return results, f"{real.name} laid out otherwise than ATen's"
    return results, None


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
    before, pairs, buffer_views = set(graph.nodes), {}, set()
    for node in complex_nodes:
        if node.op == "get_attr":  # a complex buffer (a RoPE table) is read through a real view of it
            with graph.inserting_after(node):
                pairs[node] = insert_call(graph, aten.view_as_real.default, (node,))
            buffer_views.add(pairs[node])
        else:
            with graph.inserting_before(node):
                pairs[node] = REAL_PAIRS[node.target](graph, node, pairs)
    reals = [u for n in complex_nodes for u in n.users if u.target is aten.view_as_real.default]
    reals = [u for u in reals if u not in buffer_views]
    why = next((f"{pairs[n].meta['val'].dtype} pairs of {n.name} ({n.meta['val'].dtype})" for n in complex_nodes
                if pairs[n].meta["val"].dtype != COMPONENT[n.meta["val"].dtype]), None)  # fmt: skip
    results, why = _results(graph, reals, pairs) if why is None else ({}, why)
    if why is not None:  # nothing reads the new nodes yet: remove them, last first
        for new in [n for n in reversed(graph.nodes) if n not in before]:
            graph.erase_node(new)
        log.info("complex_as_real_pairs: left the graph's complex ops as they are: %s", why)
        return PassResult("complex_as_real_pairs", 0, f"kept complex: {why}")
    for real in reals:
        real.replace_all_uses_with(results[real])
    for node in [*reals, *reversed(complex_nodes)]:  # users before what they read
        if node.op != "get_attr":
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    detail = f"{len(complex_nodes)} complex ops -> real pairs, {len(reals)} results"
    return PassResult("complex_as_real_pairs", len(reals), detail)
