"""What the sharding passes (shard_tensor_parallel, shard_experts, shard_vocabulary) share: the collectives they
insert, the recipe that cuts a rank's part of a weight, and the graph edits around both.

    w = get_attr("layers.0.mlp.down_proj.weight")     ->   w = get_attr("shard_layers_0_mlp_down_proj_weight_1_0_64")
    y = op(x, w)                                            y = op(x, w)
                                                            y = wait_tensor(all_reduce(y, "sum", group))   # sum_over_ranks
"""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from custom_ops.linear.fp8_block import BLOCK as FP8_BLOCK
from fx_passes.derived_weights import derive, recipe
from fx_passes.node_meta import insert_call

aten = torch.ops.aten
LINEAR = aten.linear.default
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


class TensorParallelError(ValueError):
    """The graph cannot be split over the ranks as asked (or the pass cannot prove its rewrite right)."""


def checkpoint_format(param: torch.Tensor) -> str | None:
    """The checkpoint format whose tensors `param` carries beside its float values ("FP8", "MXFP4", "4-bit", "NVFP4"),
    or None: a copy of it would drop them."""
    formats = (("fp8_weight", "FP8"), ("mxfp4_blocks", "MXFP4"), ("int4_tensors", "4-bit"), ("nvfp4_tensors", "NVFP4"))
    for attribute, fmt in formats:
        if hasattr(param, attribute):
            return fmt
    return None


@recipe
def shard_parameter(gm: torch.fx.GraphModule, name: str, source: str, dim: int, start: int, size: int,
                    blocks: int = 1) -> None:  # fmt: skip
    """Register `name`: [start, start + size) of the parameter `source` along `dim` (rows, columns, or experts), zeros
    past its end (a vocabulary the ranks do not divide); with `blocks`, that range of each of the equal blocks `dim`
    holds (an experts weight's gate rows then up rows), concatenated. A copy: the model keeps its whole weight, which
    the self-check and the user's module still run. An FP8 checkpoint's tensors the weight carries are cut alike: its
    e4m3 values as the weight, its scales by row (per channel) or by 128 x 128 block, where the part aligns with them."""
    whole = gm.get_parameter(source)
    if checkpoint_format(whole) not in (None, "FP8"):  # a shard without them would be rounded again, silently
        raise TensorParallelError(f"cannot shard {source}: it holds an {checkpoint_format(whole)} checkpoint's tensors "
                                  "(not supported yet)")  # fmt: skip
    part = torch.nn.Parameter(_cut(whole.detach(), dim, start, size, blocks), requires_grad=False)
    if checkpoint_format(whole) == "FP8":
        part.fp8_weight = _cut(whole.fp8_weight, dim, start, size, blocks)
        part.fp8_scale = cut_scale(whole.fp8_scale, source, dim, start, size, blocks, whole.shape)
    part.sharded_from = whole  # the module's weight, which the FP8 self-check quantizes in its place (quantize_fp8.py)
    gm.register_parameter(name, part)


def _cut(whole: torch.Tensor, dim: int, start: int, size: int, blocks: int) -> torch.Tensor:
    pieces = []
    for block in whole.chunk(blocks, dim):
        kept = max(0, min(size, block.shape[dim] - start))
        pieces.append(block.narrow(dim, min(start, block.shape[dim]), kept))  # a shard wholly past the end: zeros
        if kept < size:
            shape = list(block.shape)
            shape[dim] = size - kept
            pieces.append(block.new_zeros(shape))
    return torch.cat(pieces, dim).contiguous().clone()


def cut_scale(scale: torch.Tensor, source: str, dim: int, start: int, size: int, blocks: int,
              shape: torch.Size | list[int]) -> torch.Tensor:  # fmt: skip
    """The FP8 checkpoint scales `scale` ([N] or [N/128, K/128]) of [start, start + size) along `dim` of a weight of
    `shape` (scale_part)."""
    part = scale_part(scale.dim(), source, dim, start, size, blocks, shape)
    return scale.clone() if part is None else _cut(scale, *part)


def scale_part(scale_dims: int, source: str, dim: int, start: int, size: int, blocks: int,
               shape: torch.Size | list[int]) -> tuple[int, int, int, int] | None:  # fmt: skip
    """Which FP8 checkpoint scales go with [start, start + size) along `dim` of a weight of `shape`, as (dim, start,
    size, blocks) of the scales to cut, or None for all of them: per output channel (`scale_dims` 1, [N]: cut with the
    rows, whole for a part of the columns) or per 128 x 128 block (2, [N/128, K/128]: cut by block, where the part's
    edges fall on blocks' edges; anything else would need a requantization). checkpoint_slices.py reads a rank's
    scales by this too, so both cut the same."""
    if scale_dims == 1:
        return (0, start, size, blocks) if dim == 0 else None
    extent = shape[dim] // blocks
    edges = [start, min(start + size, extent)] + ([extent] if blocks > 1 else [])  # a block's edges too
    if any(edge % FP8_BLOCK and edge != shape[dim] for edge in edges):
        raise TensorParallelError(
            f"cannot shard {source}: this rank's part [{start}, {start + size}) along dim {dim}"
            + (f" of each of its {blocks} blocks of {extent}" if blocks > 1 else "")
            + f" does not align with its FP8 checkpoint's {FP8_BLOCK} x {FP8_BLOCK} quantization blocks; use fewer "
            "ranks, or a checkpoint quantized per channel"
        )
    return dim, start // FP8_BLOCK, -(-size // FP8_BLOCK), blocks


def shard_attr(gm: torch.fx.GraphModule, attr: torch.fx.Node, dim: int, start: int, size: int,
               before: torch.fx.Node, blocks: int = 1) -> torch.fx.Node:  # fmt: skip
    """A get_attr node, made before `before`, of [start, start + size) along `dim` of the parameter `attr` reads (of
    each of its `blocks`: shard_parameter); one copy a part, however many nodes read it."""
    name = f"shard_{attr.target.replace('.', '_')}_{dim}_{start}_{size}" + (f"_of_{blocks}" if blocks > 1 else "")
    if not hasattr(gm, name):
        derive(gm, shard_parameter, name, attr.target, dim, start, size, blocks)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    whole = attr.meta.get("val")
    if isinstance(whole, FakeTensor):
        shape = list(whole.shape)
        shape[dim] = size * blocks
        node.meta["val"] = whole.new_empty(shape)
    else:  # the part itself, not another copy of it
        node.meta["val"] = getattr(gm, name)
    return node


def use_shard(node: torch.fx.Node, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """`node` reads `new` where it read `old`; `old`, read by nothing else, is erased."""
    node.replace_input_with(old, new)
    if not old.users:
        node.graph.erase_node(old)


def sum_over_ranks(graph: torch.fx.Graph, node: torch.fx.Node, group: str) -> torch.fx.Node:
    """`wait_tensor(all_reduce(node, "sum", group))` after `node`, whose users read the sum instead; returns it."""
    users, val = list(node.users), node.meta["val"]
    with graph.inserting_after(node):
        reduced = insert_call(graph, ALL_REDUCE, (node, "sum", group), val=val.new_empty(val.shape))
    with graph.inserting_after(reduced):
        out = insert_call(graph, WAIT, (reduced,), val=val.new_empty(val.shape))
    for user in users:
        user.replace_input_with(node, out)
    return out
