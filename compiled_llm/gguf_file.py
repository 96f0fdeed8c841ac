"""GGUF files (llama.cpp's format): their architecture, read from the header, and transformers' loader
made to parse a file once.

transformers reads a GGUF file's metadata for the config, again for the tokenizer and again with the
weights: each time a new `gguf.GGUFReader` parses every value (a 49k-token vocabulary and its merges for
SmolLM2: ~6 s on a small CPU) and `load_gguf_checkpoint` converts them all (~2 s); it also rebuilds gguf's
tensor-name map once per submodule of the model (~400 times). `parsed_once` shares one reader per file,
one metadata conversion per file and one name map per architecture while a model loads (transformers
5.17 to 5.24 call all three by these names at call time), and undoes that after.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import struct
from collections.abc import Iterator
from pathlib import Path

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class _Header:
    """Sequential reads of a GGUF header; any short read is a ValueError naming the file."""

    def __init__(self, file, path: Path, size: int):
        self.file, self.path, self.size = file, path, size

    def read(self, n: int) -> bytes:
        data = self.file.read(n) if n <= self.size else b""  # a corrupt length must not allocate it
        if len(data) != n:
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): it ends inside its header")
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> bytes:
        return self.read(self.u64())

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING:
            self.file.seek(self.u64(), 1)
        elif value_type == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in _SCALAR_SIZES:
                self.file.seek(_SCALAR_SIZES[item_type] * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif value_type in _SCALAR_SIZES:
            self.file.seek(_SCALAR_SIZES[value_type], 1)
        else:
            raise ValueError(f"{self.path} is not a readable GGUF file: unknown metadata value type {value_type}")


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, after checking that its header parses and that every tensor it
    lists lies within the file (a truncated download fails here, with its name, not deep in a loader)."""
    from gguf import GGML_QUANT_SIZES

    architecture = None
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            header = _Header(file, path, size)
            if header.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a readable GGUF file: it does not start with 'GGUF'")
            header.u32()  # version
            tensor_count, kv_count = header.u64(), header.u64()
            alignment = 32
            for _ in range(kv_count):
                key, value_type = header.string(), header.u32()
                if key == b"general.architecture" and value_type == _STRING:
                    architecture = header.string().decode()
                elif key == b"general.alignment" and value_type == 4:
                    alignment = header.u32()
                else:
                    header.skip_value(value_type)
            ends = []
            for _ in range(tensor_count):
                name = header.string().decode(errors="replace")
                dims = [header.u64() for _ in range(header.u32())]
                ggml_type, offset = header.u32(), header.u64()
                if ggml_type not in GGML_QUANT_SIZES:
                    raise ValueError(f"{path} is not a readable GGUF file: tensor {name} has unknown type {ggml_type}")
                block, block_bytes = GGML_QUANT_SIZES[ggml_type]
                ends.append((offset + math.prod(dims) // block * block_bytes, name))
            data_start = -(-file.tell() // alignment) * alignment
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from None
    end, name = max(ends, default=(0, ""))
    if data_start + end > size:
        raise ValueError(f"{path} is not a readable GGUF file (truncated?): tensor {name} ends at byte "
                         f"{data_start + end}, past the end of the file ({size} bytes)")  # fmt: skip
    if architecture is None:
        raise ValueError(f"{path} has no general.architecture metadata: not a model GGUF file")
    return architecture


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """While active, `gguf.GGUFReader(path)` returns one reader per path, `gguf.get_tensor_name_map` one map
    per (architecture, layers), and transformers' `load_gguf_checkpoint(path)` (metadata only) a copy of
    one result per path."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    original_checkpoint = hf_gguf.load_gguf_checkpoint
    readers: dict[str, object] = {}
    metadata: dict[str, dict] = {}

    def shared_reader(path, mode="r"):
        if mode != "r":  # a writable map is its own
            return original_reader(path, mode)
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def checkpoint_metadata(path, return_tensors=False, *args, **kwargs):
        if return_tensors:
            return original_checkpoint(path, return_tensors, *args, **kwargs)
        key = str(Path(path).resolve())
        if key not in metadata:
            metadata[key] = original_checkpoint(path, return_tensors, *args, **kwargs)
        return copy.deepcopy(metadata[key])  # callers may change what they get

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(original_name_map)
    hf_gguf.load_gguf_checkpoint = checkpoint_metadata
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map
        hf_gguf.load_gguf_checkpoint = original_checkpoint
