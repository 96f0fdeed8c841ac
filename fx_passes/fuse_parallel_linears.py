"""fuse_parallel_linears: linears that read the same input become one GEMM over concatenated weights.

    q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
    ->
    qkv = linear(x, cat([Wq, Wk, Wv])); q, k, v = (p.contiguous() for p in split(qkv, [nq, nk, nv], -1))

Fewer, larger GEMMs read the same bytes with fewer launches (q/k/v and gate/up of every decoder layer).
The model's own parameters become views into the fused weight, so no weight is stored twice. Where the
model only views an output as [..., heads, head_dim], that view reads the fused output in place
(`as_strided`) instead of a contiguous copy.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx

from custom_ops.linear.fp8_block import BLOCK
from fx_passes.derived_weights import derive, recipe
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
LINEAR = aten.linear.default


def _parameter(gm: torch.fx.GraphModule, node) -> torch.nn.Parameter | None:
    """The parameter a get_attr node reads, if only one node of the graph reads it."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return None
    try:
        return gm.get_parameter(node.target)
    except AttributeError:  # a buffer or a constant
        return None


def _fusable(gm, node) -> bool:
    if node.op != "call_function" or node.target is not LINEAR:
        return False
    weight = _parameter(gm, node.args[1])
    bias = node.args[2] if len(node.args) > 2 else None
    return weight is not None and weight.dim() == 2 and (bias is None or _parameter(gm, bias) is not None)


@recipe
def fuse_parameters(gm: torch.fx.GraphModule, name: str, part_names: list[str]) -> None:
    """Register `name`, the parameters `part_names` concatenated along their first dimension; each part becomes a
    view of it, so nothing is stored twice."""
    parts = [gm.get_parameter(part) for part in part_names]
    fused = torch.nn.Parameter(torch.cat([p.detach() for p in parts]), requires_grad=False)
    start = 0
    for part in parts:
        part.data = fused.data[start : start + part.shape[0]]
        start += part.shape[0]
    stored = [hasattr(p, "fp8_weight") for p in parts]
    if any(stored) and not all(stored):  # the pass keeps such groups apart: fusing would drop the stored tensors
        raise ValueError(f"cannot fuse {part_names}: only some of them hold an FP8 checkpoint's tensors")
    if all(stored):  # an FP8 checkpoint's tensors, fused alike
        fused.fp8_weight = torch.cat([p.fp8_weight for p in parts])
        fused.fp8_scale = torch.cat([p.fp8_scale for p in parts])
    # A 4-bit checkpoint's tensors (int4_tensors: int4_checkpoint.py, gguf_blocks.py), a GGUF file's 5/6/8-bit blocks
    # (int8_tensors) and an NVFP4 checkpoint's (nvfp4_tensors, each part's global scale kept per channel).
    for attribute in ("int4_tensors", "int8_tensors", "nvfp4_tensors"):
        _fuse_stored(parts, fused, attribute)
    gm.register_parameter(name, fused)


def _fuse_stored(parts: list[torch.Tensor], fused: torch.Tensor, attribute: str) -> None:
    """The parts' stored `attribute` (three row-wise tensors, a tensor possibly None, then its form: group size,
    format) concatenated onto `fused` where every part has it in one form (dtypes, None-ness, group, format), each
    part's then a view of its rows, so nothing is stored twice; otherwise the fused weight has none, and the
    format's pass keeps it in the model's dtype and says so."""
    stored = [getattr(p, attribute, None) for p in parts]
    forms = {(*(None if t is None else t.dtype for t in s[:3]), *s[3:]) for s in stored if s is not None}
    if None in stored or len(forms) != 1:
        return
    columns = [None if column[0] is None else torch.cat(column) for column in zip(*(s[:3] for s in stored))]
    fused_stored = (*columns, *stored[0][3:])
    setattr(fused, attribute, fused_stored)
    start = 0
    for part in parts:
        rows = part.shape[0]
        views = (None if t is None else t[start : start + rows] for t in columns)
        setattr(part, attribute, (*views, *stored[0][3:]))
        start += rows


def _fuse(gm: torch.fx.GraphModule, group: list[torch.fx.Node], index: int) -> None:
    graph = gm.graph
    weights = [gm.get_parameter(node.args[1].target) for node in group]
    has_bias = len(group[0].args) > 2 and group[0].args[2] is not None
    sizes = [w.shape[0] for w in weights]

    def fused_parameter(name: str, position: int) -> str:
        derive(gm, fuse_parameters, name, [node.args[position].target for node in group])
        return name

    with graph.inserting_before(group[0]):  # groups keep graph order: the first linear comes first
        weight_node = graph.get_attr(fused_parameter(f"fused_linear_{index}_weight", 1))
        weight_node.meta["val"] = group[0].args[1].meta["val"].new_empty(sum(sizes), weights[0].shape[1])
        args = (group[0].args[0], weight_node)
        if has_bias:
            bias_node = graph.get_attr(fused_parameter(f"fused_linear_{index}_bias", 2))
            bias_node.meta["val"] = group[0].args[2].meta["val"].new_empty(sum(sizes))
            args += (bias_node,)
        x = group[0].args[0].meta["val"]
        fused = insert_call(graph, LINEAR, args, val=x.new_empty(*x.shape[:-1], sum(sizes)))
        parts = insert_call(graph, aten.split_with_sizes.default, (fused, sizes, -1))
        # Contiguous copies: the model views each output as [.., heads, head_dim], which `view` allows on a
        # column slice only after a check on the token count that an unbacked size cannot pass.
        outputs = [
            insert_call(graph, aten.clone.default, (insert_call(graph, operator.getitem, (parts, i)),),
                        {"memory_format": torch.contiguous_format})
            for i in range(len(group))
        ]  # fmt: skip
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for node, output, offset in zip(group, outputs, offsets):
        for view in list(node.users):
            _view_in_place(graph, view, fused, offset)
        old_params = [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
        node.replace_all_uses_with(output)
        graph.erase_node(node)
        for param_node in old_params:
            graph.erase_node(param_node)
        if not output.users:  # every use became an in-place view
            part = output.args[0]
            graph.erase_node(output)
            graph.erase_node(part)
    if not parts.users:
        graph.erase_node(parts)


def _view_in_place(graph: torch.fx.Graph, view: torch.fx.Node, fused: torch.fx.Node, offset: int) -> None:
    """Replace `view(output, [*lead, H, D])`, which only splits the output's last dimension, by a strided
    view of the fused output at the output's column `offset`."""
    if view.op != "call_function" or view.target is not aten.view.default:
        return
    out, whole = view.meta["val"], fused.meta["val"]
    lead = whole.dim() - 1
    if out.dim() != lead + 2 or [str(d) for d in out.shape[:lead]] != [str(d) for d in whole.shape[:lead]]:
        return
    if any(not isinstance(d, int) or d != 1 for d in out.shape[: lead - 1]):
        return  # only the token dimension may be larger than 1 (flat tokens): its stride is the row width
    lead_sizes = view.args[1][:lead]  # the view's own (symbolic) leading sizes
    if any(isinstance(d, int) and d < 0 for d in lead_sizes):
        return
    width, head_dim = whole.shape[-1], out.shape[-1]
    sizes = [*lead_sizes, out.shape[-2], head_dim]
    strides = [width] * lead + [head_dim, 1]
    with graph.inserting_before(view):
        strided = insert_call(graph, aten.as_strided.default, (fused, sizes, strides, offset))
    view.replace_all_uses_with(strided)
    graph.erase_node(view)


@register_pass("fuse_parallel_linears")
def fuse_parallel_linears(gm: torch.fx.GraphModule, config) -> PassResult:
    groups: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if _fusable(gm, node):
            weight = gm.get_parameter(node.args[1].target)
            has_bias = len(node.args) > 2 and node.args[2] is not None
            key = (node.args[0], weight.shape[1], weight.dtype, weight.device, has_bias)
            groups[key].append(node)
    fused = [group for group in groups.values() if len(group) > 1]
    # fp8_block scales 128-row blocks of the weight: a block across two parts would quantize them together, which
    # no checkpoint (and not the module the self-check runs) does. Such parts stay apart.
    # An FP8 checkpoint's linears fuse only with one another.
    apart = [g for g in fused if (config.quantization == "fp8_block" and any(_rows(gm, n) % BLOCK for n in g[:-1]))
             or len({hasattr(gm.get_parameter(n.args[1].target), "fp8_weight") for n in g}) > 1]  # fmt: skip
    fused = [group for group in fused if group not in apart]
    for index, group in enumerate(fused):
        _fuse(gm, group, index)
    linears = sum(len(group) for group in fused)
    detail = f"{linears} linears into {len(fused)} GEMMs" if fused else ""
    if apart:
        detail += (f"{'; ' if detail else ''}{len(apart)} groups kept apart (fp8_block parts not multiples of 128 rows, "
                   "or FP8 checkpoint weights beside float ones)")  # fmt: skip
    return PassResult("fuse_parallel_linears", len(fused), detail)


def _rows(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    return gm.get_parameter(node.args[1].target).shape[0]
