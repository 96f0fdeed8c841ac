"""GGUF files (llama.cpp's format): their architecture, read from the header, and transformers' loader
made to parse a file once.

transformers reads a GGUF file's metadata for the config, again for the tokenizer and again with the
weights: each time a new `gguf.GGUFReader` parses every value (a 49k-token vocabulary and its merges for
SmolLM2: ~6 s on a small CPU) and `load_gguf_checkpoint` converts them all (~2 s); it also rebuilds gguf's
tensor-name map once per submodule of the model (~400 times). `parsed_once` shares one reader per file,
one metadata conversion per file and one name map per architecture while a model loads (transformers'
GGUF path for Llama and most architectures calls all three by these names at call time, from 5.17 to
5.24; 5.24 also reads the header with a fast reader of its own), and undoes that after.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

GGUF_VERSIONS = (2, 3)  # what llama.cpp writes; version 1 counted in 32 bits
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class _Header:
    """Sequential reads of a GGUF header; a read or skip past the end (a truncated file, or a corrupt length)
    is a ValueError naming the file."""

    def __init__(self, file, path: Path, size: int):
        self.file, self.path, self.size = file, path, size

    def _check_room(self, n: int) -> None:
        if n > self.size - self.file.tell():  # never allocate or seek what a corrupt length says
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): it ends inside its header")

    def read(self, n: int) -> bytes:
        self._check_room(n)
        return self.file.read(n)

    def skip(self, n: int) -> None:
        self._check_room(n)
        self.file.seek(n, 1)

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> bytes:
        return self.read(self.u64())

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING:
            self.skip(self.u64())
        elif value_type == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in _SCALAR_SIZES:
                self.skip(_SCALAR_SIZES[item_type] * count)
            elif item_type == _STRING:
                for _ in range(count):
                    self.skip(self.u64())
            else:  # arrays of arrays are legal but unused by model files; nesting them could go on for ever
                raise ValueError(f"{self.path}: metadata arrays of type {item_type} are not supported")
        elif value_type in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[value_type])
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
            if size < 4 or header.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a readable GGUF file: it does not start with 'GGUF'")
            version = header.u32()
            if version not in GGUF_VERSIONS:
                raise ValueError(f"{path}: GGUF version {version} is not supported (versions {GGUF_VERSIONS} are; "
                                 "a huge number here means a big-endian file)")  # fmt: skip
            tensor_count, kv_count = header.u64(), header.u64()
            alignment = 32
            for _ in range(kv_count):
                key, value_type = header.string(), header.u32()
                if key == b"general.architecture" and value_type == _STRING:
                    architecture = header.string().decode()
                elif key == b"general.alignment" and value_type == 4:
                    alignment = header.u32()
                    if alignment == 0 or alignment & (alignment - 1):
                        raise ValueError(f"{path} is not a readable GGUF file: alignment {alignment} is not a power of two")
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


_PATCHING = threading.RLock()


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """While active, `gguf.GGUFReader(path)` returns one reader per path, `gguf.get_tensor_name_map` one map
    per (architecture, layers), and transformers' `load_gguf_checkpoint(path)` (metadata only) a copy of
    one result per path."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    # The lock: two loads in two threads must not save each other's stand-ins as the originals.
    with _PATCHING:
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
