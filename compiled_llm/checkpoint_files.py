"""Where a checkpoint directory's tensors are: its safetensors index, or the headers of its safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"


def tensor_files(path: Path) -> dict[str, Path]:
    """Every tensor of the checkpoint directory `path`, with the safetensors file that holds it."""
    from safetensors import safe_open

    index = path / INDEX_FILE
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    located = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            located.update(dict.fromkeys(f.keys(), file))
    return located
