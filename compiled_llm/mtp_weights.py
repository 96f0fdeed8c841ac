"""A checkpoint's multi-token-prediction (MTP) layers, kept loadable for speculative decoding.

DeepSeek-V3 (and GLM-4.5, whose checkpoints follow it) store `num_nextn_predict_layers` extra decoder layers after the
last one: `model.layers.61.*` for DeepSeek-V3 (its enorm, hnorm, eh_proj, a full MoE decoder layer and shared_head).
transformers does not build them and drops them at load. This module finds them in a directory's safetensors (every
`model.layers.<i>.*` tensor with i >= num_hidden_layers), reads them on request, and carries them into the directory
`compiled-llm convert` writes; the FP8 checkpoint loader sets them aside instead of refusing them as unexpected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from compiled_llm.checkpoint_files import INDEX_FILE, tensor_files

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MTP_FILE = "mtp.safetensors"


def is_mtp_tensor(name: str, num_hidden_layers: int) -> bool:
    """Whether `name` belongs to a decoder layer past the model's last: an MTP layer."""
    match = _LAYER.match(name)
    return match is not None and int(match.group(1)) >= num_hidden_layers


def mtp_tensor_files(path: Path, num_hidden_layers: int) -> dict[str, Path]:
    """The MTP tensors of the checkpoint directory `path`, each with the safetensors file that holds it."""
    located = tensor_files(path)
    return {name: file for name, file in sorted(located.items()) if is_mtp_tensor(name, num_hidden_layers)}


def load_mtp_weights(path: str | Path, num_hidden_layers: int | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The MTP layers' tensors of checkpoint directory `path`, by their checkpoint names, as stored (an FP8
    checkpoint's stay float8 beside their scales); {} where it has none. `num_hidden_layers` defaults to its
    config.json's."""
    from safetensors import safe_open

    path = Path(path)
    if num_hidden_layers is None:
        num_hidden_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    by_file: dict[Path, list[str]] = {}
    for name, file in mtp_tensor_files(path, num_hidden_layers).items():
        by_file.setdefault(file, []).append(name)
    tensors = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=device) as f:
            tensors.update({name: f.get_tensor(name) for name in names})
    return tensors


def carry_mtp_weights(source: Path, out: Path, num_hidden_layers: int) -> int:
    """Write `source`'s MTP tensors into the checkpoint directory `out` (a file of their own, listed in its
    safetensors index, which is written where `out` had a single file); returns how many."""
    from safetensors.torch import save_file

    tensors = load_mtp_weights(source, num_hidden_layers)
    if not tensors:
        return 0
    save_file({name: t.contiguous() for name, t in tensors.items()}, out / MTP_FILE, metadata={"format": "pt"})
    index = out / INDEX_FILE
    if index.exists():
        content = json.loads(index.read_text())
    else:
        from safetensors import safe_open

        (single,) = [f for f in out.glob("*.safetensors") if f.name != MTP_FILE]
        with safe_open(single, framework="pt") as f:
            content = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), single.name)}
    content["weight_map"].update(dict.fromkeys(tensors, MTP_FILE))
    index.write_text(json.dumps(content, indent=2, sort_keys=True))
    return len(tensors)
