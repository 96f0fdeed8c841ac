"""A rank of a tensor-parallel model that reads only its slices of a safetensors checkpoint (issue 26).

`meta_model(directory)` (meta_model.py) builds the model's modules with every parameter on the meta device (no
memory) and keeps the small buffers its code computes (RoPE's frequencies); `CheckpointSlices`, attached to it, knows
which checkpoint tensor each parameter is. A compile of such a model (compiled_model.py) then goes:

    capture on meta  ->  retarget(gm): device arguments, node values and the tensors as fakes on the rank's device
    passes (the shard passes' recipes cut fake tensors; fusions and quantization run on fakes)
    load(gm): every tensor the graph still reads, from the checkpoint; the recipes replayed over them, each
              shard_parameter call read as its slice of the file (safetensors reads just those bytes)

so a rank's memory holds its shards, what is replicated, and one recipe's inputs at a time: never the whole model.
Nothing here can run the unrewritten module (it has no weights): the self-check is not run, and the report says so.

An FP8 checkpoint (fp8_checkpoint.py) goes the same way: its e4m3 weights' meta parameters carry meta `fp8_weight` and
`fp8_scale`, which the passes cut (sharding.shard_parameter) and fuse as they do the whole load's, and `read_fp8`
reads a rank's part of the e4m3 values and the scales that go with it (sharding.scale_part), dequantized as
load_fp8_directory dequantizes the whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_map

from compiled_llm.checkpoint_keys import MergedSlice
from compiled_llm.fp8_checkpoint import Fp8Checkpoint, dequantized, weight_scales
from custom_ops.linear.fp8 import FP8
from fx_passes.derived_weights import derive, derived_names, registered_recipes
from fx_passes.sharding import cut_scale, scale_part, shard_parameter

log = logging.getLogger("compiled_llm")

SHARD_RECIPE = f"{shard_parameter.__module__}.{shard_parameter.__qualname__}"
GRAPH_PREFIX = "model."  # the captured graph holds the model as FlatTokenForward.model


@dataclass(frozen=True)
class Fp8Weight:
    """A weight an FP8 checkpoint stores in e4m3 (fp8_checkpoint.py), read as load_fp8_directory makes it."""

    scale: str  # the name its scales are read by (the stored key, in CheckpointSlices.keys)
    kind: str  # how they cover the weight: "channel", "tensor" or "block" (fp8_checkpoint.scale_kind)
    checkpoint: Fp8Checkpoint


class CheckpointSlices:
    """The safetensors tensor behind each parameter of a meta-device model, read whole or in parts onto `device`.
    `bytes_read` counts what was read (the test of a rank's share)."""

    def __init__(self, directory: Path, keys: dict[str, tuple | list], buffers: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device):  # fmt: skip
        self.directory = directory
        # parameter name (the model's) -> (file, tensor key), or for merged experts [expert][source] of those
        self.keys = keys
        self.buffers = buffers  # buffer name -> its value, computed at init (not in the checkpoint)
        self.dtype = dtype
        self.dtypes: dict[str, torch.dtype] = {}  # name -> the dtype the model was built (and captured) with
        self.device = torch.device(device)
        self.fp8: dict[str, Fp8Weight] = {}  # parameter name -> its FP8 checkpoint tensors, where it has them
        self.bytes_read = 0
        self.dequantized_bytes = 0  # of FP8 weights made float (read_fp8): only those a node of the graph reads
        self.peak_bytes = 0  # the most bytes of tensors the graph module held at once while loading (load())
        self.stored_bytes = 0  # of the tensors the model's parameters and buffers are, in the files
        self._files: dict[str, object] = {}

    def _slice(self, name: str):
        from safetensors import safe_open

        def stored(file: str, key: str):
            if file not in self._files:
                self._files[file] = safe_open(str(self.directory / file), framework="pt")
            return self._files[file].get_slice(key)

        place = self.keys[name]
        if isinstance(place, list):  # MoE experts transformers merges at load (checkpoint_keys.py)
            return MergedSlice([[stored(*source) for source in expert] for expert in place])
        return stored(*place)

    def _finish(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor.to(device=self.device, dtype=dtype).contiguous()

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole parameter (or persistent buffer) `name`, in the dtype the model built it with (or `dtype`)."""
        whole = self._slice(name)[()]  # all of it: `[:]` would refuse a 0-dim tensor (ModelOpt's weight scale)
        return self._finish(whole, dtype or self.dtypes.get(name, self.dtype))

    def read_part(self, name: str, dim: int, start: int, size: int, blocks: int = 1,
                  dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """What sharding.shard_parameter cuts from the whole parameter, reading only those bytes: [start, start +
        size) along `dim` of each of its `blocks` equal blocks, zeros past the end."""
        dtype = dtype or self.dtypes.get(name, self.dtype)
        part = self._slice(name)
        shape = part.get_shape()
        if not 0 <= dim < len(shape) or blocks < 1 or shape[dim] % blocks:  # shard_parameter would chunk() unevenly
            raise ValueError(
                f"loading by slices: {name} {shape} cannot be cut in {blocks} equal blocks along dim {dim}"
            )
        block = shape[dim] // blocks
        pieces = []
        for b in range(blocks):
            kept = max(0, min(size, block - start))
            first = b * block + min(start, block)
            index = tuple(slice(first, first + kept) if d == dim else slice(None) for d in range(len(shape)))
            pieces.append(self._finish(part[index], dtype))
            if kept < size:
                pad = list(shape)
                pad[dim] = size - kept
                pieces.append(torch.zeros(pad, dtype=dtype, device=self.device))
        return torch.cat(pieces, dim).contiguous()

    def read_fp8(self, name: str, cut: tuple[int, int, int, int] | None = None, values: bool = True) -> nn.Parameter:
        """The FP8 checkpoint weight `name` as load_fp8_directory makes it: dequantized in the model's dtype, carrying
        the stored e4m3 values and scales (`fp8_weight`, `fp8_scale`); with `cut` (dim, start, size, blocks), what
        sharding.shard_parameter cuts from that, reading only the part's values and its scales (scale_part says
        which, as it does for shard_parameter; a per-tensor scale, one value, is read whole and cut as there).
        Without `values` the dequantized weight is left on meta: where no node reads it (the FP8 op reads the
        stored tensors), making it would only double the rank's peak memory."""
        fp8 = self.fp8[name]
        shape = self._slice(name).get_shape()
        if cut is None:
            weight8, scale = self.read(name, FP8), weight_scales(self.read(fp8.scale), shape, fp8.checkpoint, name)
        else:
            weight8 = self.read_part(name, *cut, dtype=FP8)
            scale_cut = scale_part(1 if fp8.kind != "block" else 2, name, *cut, shape)
            if fp8.kind == "tensor" or scale_cut is None:  # one value, or every row's (a part of the columns)
                scale = cut_scale(weight_scales(self.read(fp8.scale), shape, fp8.checkpoint, name), name, *cut, shape)
            else:  # a channel's scales [N] (stored [N, 1] or [N]) or the blocks' [N/128, K/128], cut alike
                scale = self.read_part(fp8.scale, *scale_cut).float()
                scale = scale.reshape(-1) if fp8.kind == "channel" else scale
        dtype = self.dtypes.get(name, self.dtype)
        if values:
            weight = dequantized(weight8, scale, fp8.checkpoint.quantization, dtype).contiguous()
            self.dequantized_bytes += weight.numel() * weight.element_size()
        else:
            weight = torch.empty(weight8.shape, dtype=dtype, device="meta")
        param = nn.Parameter(weight, requires_grad=False)
        param.fp8_weight, param.fp8_scale = weight8, scale.contiguous()
        return param

    # -- the graph ---------------------------------------------------------------------------------------------------

    def retarget(self, gm: torch.fx.GraphModule) -> None:
        """Move a graph captured on the meta device to this rank's device, still without data: device arguments,
        every node's value, and the graph's tensors become fake tensors on the device (the passes read devices,
        shapes and dtypes; recipes run on fakes)."""
        fake_mode = next(n.meta["val"].fake_mode for n in gm.graph.nodes
                         if n.op == "placeholder" and isinstance(n.meta.get("val"), FakeTensor))  # fmt: skip

        def moved(value):
            if isinstance(value, torch.device) and value.type == "meta":
                return self.device
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                with fake_mode:
                    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=self.device)
            return value

        for node in gm.graph.nodes:
            node.args, node.kwargs = tree_map(moved, node.args), tree_map(moved, node.kwargs)
            if "val" in node.meta:
                node.meta["val"] = tree_map(moved, node.meta["val"])
        for name, tensor in named_tensors(gm):
            value = moved(tensor)
            if hasattr(tensor, "fp8_weight"):  # an FP8 checkpoint's weight: the passes cut and fuse its tensors too
                value = nn.Parameter(value, requires_grad=False)
                value.fp8_weight, value.fp8_scale = moved(tensor.fp8_weight), moved(tensor.fp8_scale)
            _set_tensor(gm, name, value)
        gm.recompile()

    def load(self, gm: torch.fx.GraphModule) -> None:
        """Replace the fakes of a rewritten graph with real tensors: the ones its nodes and recipes read, from the
        checkpoint (a shard recipe over a checkpoint tensor reads just its slice), then the recipes replayed in
        order. A tensor the graph reads that none of this made is an error naming it, never garbage."""
        try:
            self._load(gm)
        finally:
            self._files.clear()  # the safetensors files, mapped while reading, closed on an error too

    def _load(self, gm: torch.fx.GraphModule) -> None:
        calls = gm.meta.get("derived_weights", [])
        derived = derived_names(gm)
        # What the passes rewrote the graph for: every tensor loaded or built must be that again.
        promised = {n: (tuple(t.shape), t.dtype) for n, t in named_tensors(gm)}
        read_by_nodes = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        tensors = dict(named_tensors(gm))
        read_whole = {t for t in read_by_nodes if t not in derived}
        for recipe_name, args, _ in calls:  # a recipe other than a shard reads its tensor arguments whole
            if recipe_name != SHARD_RECIPE:
                read_whole |= {a for a in _strings(args) if a in tensors and a not in derived}
        for name in derived:
            _set_tensor(gm, name, None)
        gm.meta["derived_weights"] = []
        # A recipe's inputs are read just before it and dropped after the last recipe that reads them, unless a node
        # reads them too: a rank holds the graph's tensors plus one recipe's inputs at a time, never the model whole
        # beside its fused and quantized copies.
        last_reader = {arg: i for i, (_, args, _) in enumerate(calls) for arg in _strings(args)}
        loaded: set[str] = set()

        def read_whole_tensors(names) -> None:
            # An FP8 weight's dequantized values only where a node reads them: recipes over FP8 weights (shards,
            # fusions, quantize_fp8's) carry the stored tensors along, and a node left reading a value on meta is an
            # error below, never garbage.
            for name in sorted(n for n in names if n in read_whole and n not in loaded):
                _set_tensor(gm, name, self._whole(name, values=name in read_by_nodes))
                loaded.add(name)

        read_whole_tensors(read_whole & read_by_nodes)  # kept to the end anyway (and read by any recipe that looks)
        recipes = registered_recipes()
        for i, (recipe_name, args, _) in enumerate(calls):
            source = args[1] if recipe_name == SHARD_RECIPE else None
            if source is not None and source not in read_whole and source not in derived:
                name, _, *cut = args
                gm.register_parameter(name, self._part(_model_name(source), *cut, values=name in read_by_nodes))
                gm.meta["derived_weights"].append((recipe_name, args, [name]))
            else:
                read_whole_tensors(_strings(args))
                derive(gm, recipes[recipe_name], *args)
            self._note_peak(gm)
            for name in {a for a in _strings(args) if last_reader[a] == i and a not in read_by_nodes}:
                if name in tensors or name in derived:
                    _set_tensor(gm, name, None)
        self._note_peak(gm)
        for name, value in named_tensors(gm):
            if name not in read_by_nodes:  # a shard's source read in parts, a float weight quantized: not kept
                _set_tensor(gm, name, None)
            elif isinstance(value, FakeTensor) or value.device.type == "meta":
                raise RuntimeError(f"loading by slices: the graph reads {name}, which nothing loaded or built")
            elif name in promised and (tuple(value.shape), value.dtype) != promised[name]:
                raise RuntimeError(f"loading by slices: {name} loaded as {value.dtype} {list(value.shape)}, the graph "
                                   f"was rewritten for {promised[name][1]} {list(promised[name][0])}")  # fmt: skip
        for node in gm.graph.nodes:  # retarget() moved every device argument: make sure
            if any(a == "meta" or (isinstance(a, torch.device) and a.type == "meta") for a in _leaves(node)):
                raise RuntimeError(f"loading by slices: {node.format_node()} still names the meta device")
        for key in ("fp8_weights", "fp8_column_parts"):  # the self-check's, which this rank cannot run
            gm.meta.pop(key, None)
        gm.recompile()

    def _note_peak(self, gm: torch.fx.GraphModule) -> None:
        def size(t) -> int:
            real = t is not None and not isinstance(t, FakeTensor) and t.device.type != "meta"
            return t.numel() * t.element_size() if real else 0

        live = {id(t): t for _, t in named_tensors(gm)}.values()
        held = sum(size(t) + size(getattr(t, "fp8_weight", None)) + size(getattr(t, "fp8_scale", None)) for t in live)
        self.peak_bytes = max(self.peak_bytes, held)

    def _whole(self, graph_name: str, values: bool = True) -> torch.Tensor:
        name = _model_name(graph_name)
        if name in self.buffers:
            return self.buffers[name].to(self.device)
        if name not in self.keys:
            raise RuntimeError(f"loading by slices: {graph_name} is in the graph but not in {self.directory}")
        if name in self.fp8:
            return self.read_fp8(name, values=values)
        return nn.Parameter(self.read(name), requires_grad=False)

    def _part(self, name: str, dim: int, start: int, size: int, blocks: int = 1, values: bool = True) -> nn.Parameter:
        if name in self.fp8:
            return self.read_fp8(name, (dim, start, size, blocks), values)
        return nn.Parameter(self.read_part(name, dim, start, size, blocks), requires_grad=False)


def stored_places(place) -> list[tuple[str, str]]:
    return [source for expert in place for source in expert] if isinstance(place, list) else [place]


def named_tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]


def _leaves(node: torch.fx.Node) -> list:
    leaves = []
    tree_map(leaves.append, (node.args, node.kwargs))
    return leaves


def _model_name(graph_name: str) -> str:
    return graph_name.removeprefix(GRAPH_PREFIX)


def _strings(args) -> Iterator[str]:
    for arg in args:
        if isinstance(arg, str):
            yield arg
        elif isinstance(arg, (tuple, list)):
            yield from _strings(arg)


def owning_module(gm: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (gm.get_submodule(path) if path else gm), leaf


def _get_tensor(gm: nn.Module, name: str) -> torch.Tensor | None:
    module, leaf = owning_module(gm, name)
    return module._parameters.get(leaf, module._buffers.get(leaf))


def _set_tensor(gm: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set (or with None, remove) the parameter or buffer `name`, keeping its kind."""
    module, leaf = owning_module(gm, name)
    if leaf in module._buffers and not isinstance(value, nn.Parameter):
        if value is None:
            del module._buffers[leaf]
        else:
            module._buffers[leaf] = value
    elif value is None:
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)
    else:
        module._buffers.pop(leaf, None)
        module._parameters[leaf] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
