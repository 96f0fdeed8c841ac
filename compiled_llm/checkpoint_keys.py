"""Which tensors of a safetensors checkpoint a model's parameters are, as transformers' own loading decides, for a
rank that reads slices of them (checkpoint_slices.py).

transformers renames some stored keys at load (`WeightRenaming`), and merges MoE checkpoints' per-expert tensors
into one parameter (`WeightConverter`):

    mlp.experts.{e}.gate_proj.weight [I, H], mlp.experts.{e}.up_proj.weight [I, H]  ->  mlp.experts.gate_up_proj [E, 2I, H]
    mlp.experts.{e}.down_proj.weight [H, I]                                        ->  mlp.experts.down_proj [E, H, I]

(MergeModulelist(dim=0), then Concatenate(dim=1) where there are two sources). A merged parameter is read through
`MergedSlice`, which takes the same slicing as a stored tensor and reads only the experts and rows it covers. Any
other conversion is refused: a slice of its stored tensor need not be the slice of the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


@dataclass
class StoredTensors:
    """Parameter and buffer names -> the stored key they load from, or for a merged one its keys [expert][source]."""

    single: dict[str, str] = field(default_factory=dict)
    merged: dict[str, list[list[str]]] = field(default_factory=dict)


def stored_keys(model: nn.Module, keys: list[str]) -> tuple[StoredTensors | None, str]:
    """Where each of the model's tensors is among the stored `keys`, or (None, why not)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError as error:
        return None, f"this transformers does not say how it renames checkpoint tensors ({error})"
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if len(renamings) + len(converters) != len(transforms):
        other = next(t for t in transforms if not isinstance(t, (WeightRenaming, WeightConverter)))
        return None, f"transformers transforms its tensors at load in a way not read here ({type(other).__name__})"
    state = model.state_dict()
    stored, parts = StoredTensors(), {}  # parts: name -> {(source index, expert): key}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if name not in state:
            continue  # a tensor the model does not load (an MTP layer's, say)
        if pattern is None:
            stored.single[name] = key
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        operations = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        merge = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(converter.source_patterns) > 1 else [])
        renamed, _ = rename_source_key(key, renamings, [], model.base_model_prefix, state)
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
        if operations != merge or expert is None or pattern.count("*") != 1:
            return None, f"transformers converts the files' {key} into {name} at load ({converter.operations})"
        parts.setdefault(name, {})[(converter.source_patterns.index(pattern), int(expert.group(1)))] = key
    for name, found in parts.items():
        sources = 1 + max(source for source, _ in found)
        experts = 1 + max(expert for _, expert in found)
        if len(found) != sources * experts:
            return None, f"{name}: the files hold {len(found)} of its {sources} x {experts} expert tensors"
        stored.merged[name] = [[found[source, expert] for source in range(sources)] for expert in range(experts)]
    return stored, ""


def merged_shape(keys: list[list[str]], shapes: dict[str, list[int]]) -> list[int] | None:
    """The shape of the parameter merged from `keys` [expert][source], or None where the experts' shapes differ."""
    first = [shapes[key] for key in keys[0]]
    if any([shapes[key] for key in expert] != first for expert in keys) or any(s[1:] != first[0][1:] for s in first):
        return None
    return [len(keys), sum(s[0] for s in first), *first[0][1:]]


class MergedSlice:
    """A merged parameter [E, rows of each source concatenated, ...] sliced as a stored tensor is (`[index]`,
    `get_shape`, `get_dtype`), reading only the experts and the rows of each source the index covers."""

    def __init__(self, experts: list[list]):  # [expert][source] safetensors slices
        self.experts = experts
        self.rows = [part.get_shape()[0] for part in experts[0]]
        self.shape = [len(experts), sum(self.rows), *experts[0][0].get_shape()[1:]]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.experts[0][0].get_dtype()

    def __getitem__(self, index) -> torch.Tensor:
        index = (index,) if not isinstance(index, tuple) else index
        index = (*index, *[slice(None)] * (len(self.shape) - len(index)))
        if any(i.step not in (None, 1) for i in index):
            raise ValueError(f"MergedSlice takes contiguous slices, got {index}")
        first, last = index[0].indices(self.shape[0])[:2]
        row_first, row_last = index[1].indices(self.shape[1])[:2]
        experts = []
        for sources in self.experts[first:last]:
            rows, offset = [], 0
            for part, count in zip(sources, self.rows):
                lo, hi = max(row_first, offset), min(row_last, offset + count)
                if lo < hi:
                    rows.append(part[(slice(lo - offset, hi - offset), *index[2:])])
                offset += count
            experts.append(torch.cat(rows) if rows else None)
        if not experts or experts[0] is None:
            shape = [max(0, last - first), max(0, row_last - row_first)]
            shape += [len(range(*i.indices(n))) for i, n in zip(index[2:], self.shape[2:])]
            return torch.empty(shape, dtype=SAFETENSORS_DTYPES[self.get_dtype()])
        return torch.stack(experts)
