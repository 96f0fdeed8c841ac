"""The self-check's reference for weight formats whose tensors the pass made from a search (int4_awq, int8_sq, nvfp4)
or took from a checkpoint: the module's own nn.Linear layers compute as the format's reference op, each layer over its
rows of the rewritten graph's weight (a fused q/k/v or gate/up weight's parts share its storage).

Where the pass rounded a float weight, the reference rounds the module's own weight again, with only what the search
chose kept from the pass (the smooth, and AWQ's clips and grids: `Rerounding`), so that a code or scale the pass wrote
wrongly is not also the reference's: int8_sq (quantize_int8.int8_module), int4_awq (quantize_int4.int4_module) and
nvfp4 rounded at compile time (quantize_nvfp4.nvfp4_module, each part of a fused weight with the whole's global
scale). A checkpoint's stored codes (AWQ, GPTQ, GGUF, a ModelOpt or compressed-tensors NVFP4 checkpoint) have no float
weight to round again (the module's weight is their dequantization): the reference reads them as the graph holds
them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

# The graph meta keys under which the quantizing passes list the weights they replaced, for the self-check: tensors of
# this process, never stored with a graph.
WEIGHT_RECORDS = ("fp8_weights", "fp8_input_scales", "int4_weights", "int8_weights", "nvfp4_weights",
                  "int8_block_weights")


class Rerounding(NamedTuple):
    """What a 4-bit pass rounded a float weight with besides its smooth, for the self-check's reference to round the
    module's own weight alike (int4_awq, nvfp4; a record's None: a checkpoint's stored codes, read as held). `clip`
    [N, K / G] and `grid` [N, K / G, 2]: AWQ's search's (None where it chose none), float32 on the host until the
    self-check has run (release_roundings), since they are as large as 1/4 byte a weight (NVFP4's clips: 1.75 GB for
    an 8B model), which the GPU's memory would miss from the KV cache sized before the self-check. `offsets`:
    int4's storage form (quantize_int4.OFFSETS). `kept` False: compiled with verify=False, the search's clips or
    grids were not kept (or were released after the self-check: release_roundings), and the reference cannot round
    the weight again."""

    clip: torch.Tensor | None = None
    grid: torch.Tensor | None = None
    offsets: bool = False
    kept: bool = True


def rerounding(clip: torch.Tensor | None, grid: torch.Tensor | None, offsets: bool, keep: bool) -> Rerounding:
    """A calibrated weight's Rerounding, its clip and grid copied to the host where `keep` (the self-check may run:
    CompileConfig.verify is not False); without them where not (`kept` False, unless it had none)."""
    if not keep and (clip is not None or grid is not None):
        return Rerounding(offsets=offsets, kept=False)
    host = lambda t: None if t is None else t.detach().to("cpu", torch.float32)
    return Rerounding(host(clip), host(grid), offsets)


def rows_of(tensor: torch.Tensor | None, first: int, count: int, device: torch.device) -> torch.Tensor | None:
    """`count` rows of a kept clip or grid from `first`, on `device` (a part of a fused weight's)."""
    return None if tensor is None else tensor[first : first + count].to(device)


def check_kept(rounding: Rerounding, fmt: str) -> None:
    if not rounding.kept:
        raise ValueError(f"the {fmt} graph keeps none of AWQ's clips or grids for a reference that rounds the module's "
                         "weights again: compiled with verify=False, or released after its self-check "
                         "(release_roundings)")  # fmt: skip


# Tests set it to keep the records' clips and grids past the self-check, to round the weights again themselves.
KEEP_ROUNDINGS = False


def release_roundings(meta: dict) -> None:
    """Drop the clips and grids the graph's records keep for the self-check (`meta`: the graph's), once it has run or
    will not: on the host, as large as 1/4 byte a weight, and nothing else reads them."""
    if KEEP_ROUNDINGS:
        return
    for key in ("int4_weights", "nvfp4_weights"):  # the records that end in a Rerounding (or None)
        records = meta.get(key) or []
        for i, (weight, tensors) in enumerate(records):
            if isinstance(tensors[-1], Rerounding):
                records[i] = (weight, (*tensors[:-1], Rerounding(offsets=tensors[-1].offsets, kept=False)))


# forward(module, x, tensors, first, count): the layer's output from the format's tensors, of whose rows it owns
# `count` from `first`.
PartForward = Callable[[torch.nn.Linear, torch.Tensor, tuple, int, int], torch.Tensor]


def divided_smooth(smooth: torch.Tensor | None, smooth_rows: list[int]) -> torch.Tensor | None:
    """A fused weight's smooth [P, K] as a row for each output channel [N, K] (each part's channels its row)."""
    return None if smooth is None else smooth.repeat_interleave(torch.tensor(smooth_rows, device=smooth.device), 0)


def part_smooth(smooth: torch.Tensor | None, smooth_rows: list[int], first: int,
                count: int) -> tuple[torch.Tensor | None, list[int]]:  # fmt: skip
    """The (smooth, smooth_rows) of the part of a fused 4-bit weight's rows from `first` (`count` of them): its row of
    the fused weight's smooth [P, K], or none."""
    if smooth is None:
        return None, []
    part = [sum(smooth_rows[:p]) for p in range(len(smooth_rows))].index(first)
    return smooth[part : part + 1], [count]


def linear_parts(model: torch.nn.Module, records: list, fmt: str) -> list[tuple]:
    """(module, whole, tensors, first, count) for each nn.Linear of `model` whose weight is one of `records` ((weight,
    tensors) as the pass listed them): the weight it is rows `first:first + count` of (a fused one's part, or itself)
    and that weight's tensors. A recorded weight that no nn.Linear reads is refused, naming its shape."""
    by_storage = {w.untyped_storage().data_ptr(): (w, tensors) for w, tensors in records}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.untyped_storage().data_ptr() in by_storage]  # fmt: skip
    covered = {m.weight.untyped_storage().data_ptr() for m in linears}
    missing = [tuple(w.shape) for ptr, (w, _) in by_storage.items() if ptr not in covered]
    if missing:
        raise ValueError(f"quantization {fmt} rewrote linears over weights {missing} that no nn.Linear of the module "
                         "reads, so the self-check cannot compute what the rewrite means; compile_model(..., "
                         "verify=False) accepts it unchecked")  # fmt: skip
    parts = []
    for module in linears:
        whole, tensors = by_storage[module.weight.untyped_storage().data_ptr()]
        first = (module.weight.storage_offset() - whole.storage_offset()) // whole.stride(0)
        parts.append((module, whole, tensors, first, module.weight.shape[0]))
    return parts


@contextlib.contextmanager
def linears_computing_as(model: torch.nn.Module, records: list, forward: PartForward, fmt: str) -> Iterator[None]:
    """Within the block, each nn.Linear of `model` whose weight is one of `records` ((weight, tensors) as the pass
    listed them) runs `forward` (linear_parts: a recorded weight that no nn.Linear reads is refused)."""
    parts = {module: (tensors, first, count) for module, _, tensors, first, count in linear_parts(model, records, fmt)}

    def part_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return forward(module, x, *parts[module])

    try:
        for module in parts:
            module.forward = part_forward.__get__(module)
        yield
    finally:
        for module in parts:
            del module.forward
