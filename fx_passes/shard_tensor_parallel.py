"""shard_tensor_parallel: split the model's linears over `tensor_parallel_size` ranks, as the model's own
tensor-parallel plan says (transformers' `base_model_tp_plan`: "colwise" / "rowwise" per module), and sum the
row-parallel outputs with an all-reduce that Inductor sees (a functional collective).

    q = linear(x, Wq)              # Wq [H*D, E]              q = linear(x, Wq_r)          # rows of this rank's heads
    q = view(q, [1, T, H, D])                          ->     q = view(q, [1, T, H/n, D])
    k = ..., v = ...               # Hkv heads                k = ..., v = ...             # Hkv/n heads (or 1, shared)
    a = attention(q, k, v)         # [T, H, D]                a = attention(q, k, v)       # [T, H/n, D]
    a = reshape(a, [1, T, H*D])                               a = reshape(a, [1, T, H*D/n])
    o = linear(a, Wo)              # Wo [E, H*D]              o = linear(a, Wo_r)          # this rank's columns
                                                              o = wait_tensor(all_reduce(o, "sum", group))

The rewrite is proven, not guessed: from each column-parallel linear the pass follows its output forward and
records which slice of which dimension every value holds. An op passes a slice through only where the pass
knows its semantics (elementwise with broadcasting, transposes, reductions over other dimensions, the
canonical attention op); a view must split or merge the sliced dimension as its outermost one, and the pass
rewrites its size (the head counts export baked in) to the rank's. A row-parallel linear must read a value
split evenly over the ranks along its input features: it takes the same columns and all-reduces. Anything
else that reads a sliced value is refused with an error naming the op: a wrong guess would be a silently
wrong answer. KV heads fewer than the ranks are replicated (each rank keeps the KV head its query heads use),
which the attention op's check proves.

Runs before fuse_parallel_linears (which fuses the sharded q/k/v and gate/up) and quantize_fp8 (which
quantizes the shards). The embedding and LM head are split by vocabulary rows in shard_vocabulary.py; MoE experts
stay replicated unless expert_parallel_size (equal to tensor_parallel_size) splits them (shard_experts.py).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from compiled_llm.parallel_ranks import parallel_rank
from fx_passes.causal_mask import user_line
from fx_passes.match_sdpa_attention import CANONICAL_ATTENTION
from fx_passes.node_match import CASTS, VIEWS, sym_expr
from fx_passes.node_meta import insert_call, set_fake_value
from fx_passes.registry import PassResult, register_pass
from fx_passes.sharding import LINEAR, TensorParallelError, shard_attr, sum_over_ranks, use_shard

aten = torch.ops.aten
_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
_SOFTMAX = (aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)


@dataclass(frozen=True)
class Slice:
    """Which part of dimension `dim` a rank's tensor holds: [start, start + size) of `total`."""

    dim: int
    start: int
    size: int
    total: int

    def moved(self, dim: int) -> Slice:
        return Slice(dim, self.start, self.size, self.total)

    def even(self, rank: int, world: int) -> bool:
        """Whether the ranks' slices partition the dimension (none replicated)."""
        return self.size * world == self.total and self.start == rank * self.size


def _plan_style(plan: dict[str, str], weight_target: str) -> str | None:
    module = weight_target.rsplit(".", 1)[0]
    for pattern, style in plan.items():
        if re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), module):
            return style
    return None


class _Sharder:
    def __init__(self, gm: torch.fx.GraphModule, plan: dict[str, str], rank: int, world: int, group: str):
        self.gm, self.graph = gm, gm.graph
        self.plan, self.rank, self.world, self.group = plan, rank, world, group
        self.slices: dict[torch.fx.Node, Slice] = {}
        self.whole: dict[torch.fx.Node, object] = {}  # a resized node's value before the pass (whole sizes)
        self.columns = self.rows = 0

    # -- errors -----------------------------------------------------------------------------------------------------

    def refuse(self, node: torch.fx.Node, why: str):
        op = _name(node.target) if node.op == "call_function" else node.op
        where = user_line(node) if node.op == "call_function" else ""
        raise TensorParallelError(
            f"tensor_parallel_size={self.world}: cannot shard node {node.name} ({op}{f', at {where}' if where else ''})"
            f": {why}"
        )

    # -- the walk ---------------------------------------------------------------------------------------------------

    def run(self) -> None:
        for node in list(self.graph.nodes):
            style = self._style(node)
            if style == "colwise":
                self._column_parallel(node)
            elif style == "rowwise":
                self._row_parallel(node)
            elif any(isinstance(a, torch.fx.Node) and a in self.slices for a in node.all_input_nodes):
                self._propagate(node)

    def _style(self, node: torch.fx.Node) -> str | None:
        if node.op != "call_function" or node.target is not LINEAR:
            return None
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            return None
        return _plan_style(self.plan, weight.target)

    def _resize(self, node: torch.fx.Node, val=None) -> None:
        self.whole.setdefault(node, node.meta["val"])
        if val is None:
            set_fake_value(node)
        else:
            node.meta["val"] = val

    # -- the plan's linears -----------------------------------------------------------------------------------------

    def _column_parallel(self, linear: torch.fx.Node) -> None:
        """Rows of the weight (and bias) for this rank's heads, or its share of the features."""
        x, weight, *rest = linear.args
        if x in self.slices:
            self.refuse(linear, "a column-parallel linear reads a value that is already split over the ranks")
        rows = int(weight.meta["val"].shape[0])
        heads = _heads_of_view(linear)
        units = heads or rows
        if units % self.world == 0:
            start, size = self.rank * units // self.world, units // self.world
        elif heads and self.world % heads == 0:  # fewer KV heads than ranks: each rank keeps the one its queries use
            start, size = self.rank * heads // self.world, 1
        else:
            what = f"{heads} heads ({rows} rows)" if heads else f"{rows} output features"
            self.refuse(linear, f"{self.world} ranks do not divide the {what} of the "
                                f"column-parallel linear {weight.target.rsplit('.', 1)[0]}")  # fmt: skip
        per_unit = rows // units
        start, size = start * per_unit, size * per_unit
        use_shard(linear, weight, shard_attr(self.gm, weight, 0, start, size, linear))
        bias = rest[0] if rest else None
        if isinstance(bias, torch.fx.Node):
            use_shard(linear, bias, shard_attr(self.gm, bias, 0, start, size, linear))
        whole = linear.meta["val"]
        self._resize(linear, whole.new_empty(*whole.shape[:-1], size))
        self.slices[linear] = Slice(whole.dim() - 1, start, size, rows)
        self.columns += 1

    def _row_parallel(self, linear: torch.fx.Node) -> None:
        """This rank's columns of the weight over its slice of the input, summed over the ranks."""
        x, weight, *rest = linear.args
        part = self.slices.get(x)
        last = x.meta["val"].dim() - 1
        if part is None or part.dim != last:
            self.refuse(linear, "a row-parallel linear must read a value split over the ranks along its input "
                                "features (the output of column-parallel linears)")  # fmt: skip
        if part.total != weight.meta["val"].shape[1]:
            self.refuse(linear, f"its input holds a part of {part.total} features, its weight reads "
                                f"{weight.meta['val'].shape[1]}")  # fmt: skip
        if not part.even(self.rank, self.world):
            self.refuse(linear, f"its input is not split evenly over the ranks (this rank holds {part.size} of "
                                f"{part.total} features, from {part.start}): replicated heads cannot be summed")  # fmt: skip
        use_shard(linear, weight, shard_attr(self.gm, weight, 1, part.start, part.size, linear))
        bias = rest[0] if rest else None
        if bias is not None:  # added once, after the sum
            linear.args = linear.args[:2]
        out = sum_over_ranks(self.graph, linear, self.group)
        if bias is not None:
            users = list(out.users)
            with self.graph.inserting_after(out):
                added = insert_call(self.graph, aten.add.Tensor, (out, bias))
            for user in users:
                user.replace_input_with(out, added)
        self.rows += 1

    # -- following a slice ------------------------------------------------------------------------------------------

    def _propagate(self, node: torch.fx.Node) -> None:
        if node.op == "output":
            self.refuse(node, "the graph's output would hold one rank's part only (a column-parallel linear "
                              "not followed by a row-parallel one)")  # fmt: skip
        if node.op != "call_function":
            self.refuse(node, "reads a value split over the ranks")
        target, args = node.target, node.args
        src = args[0] if args else None
        part = self.slices.get(src) if isinstance(src, torch.fx.Node) else None
        if target in VIEWS:
            self._view(node, part)
            return
        if target is aten.sym_size.int:
            if part is not None and _dim(args[1], src) == part.dim:
                self.refuse(node, "reads the size of the dimension split over the ranks")
            return
        out: Slice | None = None
        if target is CANONICAL_ATTENTION:
            out = self._attention(node)
        elif _pointwise(target):
            out = self._broadcast(node)
        elif target is aten.transpose.int and part is not None:
            d0, d1 = _dim(args[1], src), _dim(args[2], src)
            out = part.moved({d0: d1, d1: d0}.get(part.dim, part.dim))
        elif target is aten.permute.default and part is not None:
            out = part.moved([_dim(d, src) for d in args[1]].index(part.dim))
        elif target is aten.unsqueeze.default and part is not None:
            dim = args[1] % (src.meta["val"].dim() + 1)
            out = part.moved(part.dim + (dim <= part.dim))
        elif target in (aten.select.int, aten.squeeze.dim) and part is not None:
            dim = _dim(args[1], src)
            if dim != part.dim:
                out = part.moved(part.dim - (dim < part.dim))
        elif target is aten.slice.Tensor and part is not None:
            if _dim(args[1] if len(args) > 1 else 0, src) != part.dim:
                out = part
        elif target is aten.cat.default:
            out = self._cat(node)
        elif target in _REDUCTIONS and part is not None:
            dims = [_dim(d, src) for d in (args[1] if len(args) > 1 else [])]
            if dims and part.dim not in dims:
                keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
                out = part if keep else part.moved(part.dim - sum(d < part.dim for d in dims))
        elif target in _SOFTMAX and part is not None:
            if _dim(args[1], src) != part.dim:
                out = part
        elif target in _SPLITS and part is not None:
            if _dim(args[2] if len(args) > 2 else node.kwargs.get("dim", 0), src) != part.dim:
                out = part
        elif target is operator.getitem and part is not None:
            out = part
        if out is None:
            self.refuse(node, f"{_name(target)} reads a value split over the ranks, and the pass does not know that "
                              "it works on each rank's part alone")  # fmt: skip
        self.slices[node] = out
        self._resize(node)

    def _broadcast(self, node: torch.fx.Node) -> Slice:
        """Elementwise: every operand holds the same slice, or broadcasts (size 1) along its dimension."""
        rank_out = node.meta["val"].dim()
        dims, parts = set(), set()
        for arg in node.all_input_nodes:
            if arg in self.slices:
                part = self.slices[arg]
                dims.add(part.dim + rank_out - arg.meta["val"].dim())
                parts.add((part.start, part.size, part.total))
        if len(dims) != 1 or len(parts) != 1:
            self.refuse(node, "its operands are split over the ranks along different dimensions or in different parts")
        dim = dims.pop()
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            if arg in self.slices or not isinstance(val, torch.Tensor):
                continue
            aligned = dim - (rank_out - val.dim())
            if aligned >= 0 and sym_expr(val.shape[aligned]) != 1:
                self.refuse(node, f"it combines a value split over the ranks with {arg.name}, whole along that "
                                  "dimension")  # fmt: skip
        start, size, total = parts.pop()
        return Slice(dim, start, size, total)

    def _cat(self, node: torch.fx.Node) -> Slice:
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        parts = {self.slices.get(t) for t in tensors}
        if len(parts) != 1 or None in parts:
            self.refuse(node, "concatenates values split over the ranks with others, or split differently")
        part = parts.pop()
        if _dim(dim, tensors[0]) == part.dim:
            self.refuse(node, "concatenates along the dimension split over the ranks")
        return part

    def _view(self, node: torch.fx.Node, part: Slice | None) -> None:
        """A view that splits or merges the sliced dimension as the outermost of its group (heads -> heads x
        head_dim, heads x head_dim -> features): its size there becomes the rank's."""
        src, sizes = node.args[0], node.args[1]
        if part is None or not isinstance(sizes, (list, tuple)):
            self.refuse(node, "a view of a value split over the ranks, with sizes the pass cannot read")
        before = [sym_expr(s) for s in self.whole[src].shape]
        after = [sym_expr(s) for s in node.meta["val"].shape]
        group = _group(before, after, part.dim, part.size == part.total)
        if group is None:
            self.refuse(node, "a view that does not keep the dimension split over the ranks as the outermost of "
                              "the dimensions it splits or merges: not a head reshape the pass can prove")  # fmt: skip
        dim = group
        if not isinstance(sizes[dim], int) or sizes[dim] < 0 or not after[dim].is_Integer:
            self.refuse(node, f"the view's size {sizes[dim]} at the split dimension is not a constant to rewrite")
        ratio = sympy.Rational(int(after[dim]), part.total)
        start, size = part.start * ratio, part.size * ratio
        if not (start.is_Integer and size.is_Integer):
            self.refuse(node, f"this rank's {part.size} of {part.total} does not cover whole entries of the view's "
                              f"{int(after[dim])} (heads not divisible by tensor_parallel_size={self.world})")  # fmt: skip
        new_sizes = list(sizes)
        new_sizes[dim] = int(size)
        node.update_arg(1, new_sizes)
        self.slices[node] = Slice(dim, int(start), int(size), int(after[dim]))
        self._resize(node)

    def _attention(self, node: torch.fx.Node) -> Slice:
        """q, k, v split by heads ([T, H, D]), each rank's query heads reading the KV heads they read unsharded."""
        q, k, v, layer, *_, sinks = node.args
        parts = [self.slices.get(t) for t in (q, k, v)]
        if any(p is None or p.dim != 1 for p in parts):
            self.refuse(node, "attention needs q, k and v all split over the ranks by heads")
        pq, pk, pv = parts
        if sinks is not None:
            self.refuse(node, "attention sinks are not sharded yet")
        if (pk.start, pk.size, pk.total) != (pv.start, pv.size, pv.total):
            self.refuse(node, "keys and values are split over the ranks differently")
        if not pq.even(self.rank, self.world):
            self.refuse(node, f"{self.world} ranks do not divide the {pq.total} query heads of "
                              f"attention layer {layer}")  # fmt: skip
        group, local_group = pq.total // pk.total, pq.size // pk.size
        ok = pq.total % pk.total == 0 and pq.size % pk.size == 0
        if not ok or any((pq.start + h) // group != pk.start + h // local_group for h in range(pq.size)):
            self.refuse(node, f"the {pk.total} KV heads of attention layer {layer} cannot be split or replicated to "
                              f"match {pq.total} query heads over {self.world} ranks")  # fmt: skip
        return pq


def _heads_of_view(linear: torch.fx.Node) -> int | None:
    """H, where the linear's only use views its output [..., H*D] as [..., H, D]."""
    if len(linear.users) != 1:
        return None
    view = next(iter(linear.users))
    if view.op != "call_function" or view.target not in VIEWS:
        return None
    before, after = linear.meta["val"].shape, view.meta["val"].shape
    if len(after) != len(before) + 1 or [str(d) for d in after[:-2]] != [str(d) for d in before[:-1]]:
        return None
    heads, dim = after[-2], after[-1]
    if isinstance(heads, int) and isinstance(dim, int) and heads * dim == before[-1]:
        return heads
    return None


def _group(before: list, after: list, dim: int, whole: bool = False) -> int | None:
    """The dimension of `after` that starts where `before[dim]` starts, if a reshape keeps `dim` the outermost of
    the dimensions it splits or merges with; else None. `whole`: each rank's part of `dim` is all of it."""
    prefix = math.prod(before[:dim])
    starts = [j for j in range(len(after)) if math.prod(after[:j]) == prefix]
    if not starts:
        return None
    # Past size-1 dimensions, to the one that holds the entries; but a rank that holds every entry (one KV head
    # replicated on every rank) keeps the outermost: [T, 1 * 64] -> [T, 1, 64] is one head, not a part of head_dim.
    start = starts[0] if whole else starts[-1]
    for end_before in range(dim + 1, len(before) + 1):
        if any(math.prod(before[:end_before]) == math.prod(after[:j]) for j in range(start + 1, len(after) + 1)):
            return start
    return None


def _dim(dim: int, node: torch.fx.Node) -> int:
    return dim % max(node.meta["val"].dim(), 1)


def _pointwise(target) -> bool:
    return (
        target in CASTS
        or target is aten._to_copy.default
        or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)
    )


def _name(target) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def shard(gm: torch.fx.GraphModule, plan: dict[str, str], rank: int, world: int, group: str) -> tuple[int, int]:
    """Shard `gm` in place for `rank` of `world`; returns (column-parallel, row-parallel) linears rewritten."""
    sharder = _Sharder(gm, plan, rank, world, group)
    sharder.run()
    gm.recompile()
    return sharder.columns, sharder.rows


@register_pass("shard_tensor_parallel")
def shard_tensor_parallel(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.tensor_parallel_size == 1:
        return PassResult("shard_tensor_parallel", 0)
    rank, world = parallel_rank(config)
    plan = gm.meta.get("tp_plan")
    if not plan:
        raise TensorParallelError(
            f"tensor_parallel_size={world}: the model has no tensor-parallel plan (transformers' base_model_tp_plan) "
            "to shard it by; only models whose config has one can be sharded for now"
        )
    import torch.distributed as dist

    columns, rows = shard(gm, plan, rank, world, dist.group.WORLD.group_name)
    if columns + rows == 0:
        raise TensorParallelError(f"tensor_parallel_size={world}: no linear of the graph matches the model's "
                                  f"tensor-parallel plan {sorted(plan)}")  # fmt: skip
    others = sorted({style for style in plan.values() if style not in ("colwise", "rowwise")})
    detail = f"rank {rank} of {world}: {columns} column-parallel, {rows} row-parallel linears (+{rows} all-reduces)"
    if others:  # the vocabulary's and the experts' styles are shard_vocabulary's and shard_experts' (or replicated)
        detail += f"; plan styles not this pass's: {', '.join(others)}"
    return PassResult("shard_tensor_parallel", columns + rows, detail)
