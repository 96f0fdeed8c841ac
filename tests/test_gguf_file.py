"""GGUF files: the header read (files written by the gguf package itself, then damaged) and the loader
patches that make transformers parse a file once, undone after a load that fails."""

from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from compiled_llm.gguf_file import gguf_architecture, parsed_once  # noqa: E402


def write_gguf(path, alignment: int | None = None) -> bytes:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_token_list(["a", "bb", "ccc"])
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_architecture_of_a_whole_file(tmp_path):
    write_gguf(tmp_path / "model.gguf", alignment=64)
    assert gguf_architecture(tmp_path / "model.gguf") == "llama"


def damaged(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_damaged_files_are_named_value_errors(tmp_path):
    data = write_gguf(tmp_path / "model.gguf")
    key = b"general.architecture"
    cases = {
        "truncated in the tensors": (data[:-40], "past the end of the file"),  # past the last padding
        "truncated in the header": (data[: data.index(key) + 4], "ends inside its header"),
        "not gguf": (b"GGML" + data[4:], "does not start with 'GGUF'"),
        "version 1": (data[:4] + struct.pack("<I", 1) + data[8:], "GGUF version 1 is not supported"),
        "big-endian": (data[:4] + struct.pack(">I", 3) + data[8:], "a huge number here means a big-endian file"),
        # The length of the first key: far past the end of the file (it must not be read or allocated).
        "huge length": (data[:24] + struct.pack("<Q", 1 << 63) + data[32:], "ends inside its header"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            gguf_architecture(damaged(tmp_path, bad, name.replace(" ", "_") + ".gguf"))
    # The last tensor's ggml type (after its dims), made unknown.
    name_at = data.rindex(b"output_norm.weight") + len(b"output_norm.weight")
    type_at = name_at + 4 + 8  # one dimension
    bad = data[:type_at] + struct.pack("<I", 999) + data[type_at + 4 :]
    with pytest.raises(ValueError, match="tensor output_norm.weight has unknown type 999"):
        gguf_architecture(damaged(tmp_path, bad, "unknown_type.gguf"))


def test_alignment_must_be_a_power_of_two(tmp_path):
    data = write_gguf(tmp_path / "model.gguf", alignment=64)
    at = data.index(b"general.alignment") + len(b"general.alignment") + 4  # past the key and the value type
    bad = data[:at] + struct.pack("<I", 0) + data[at + 4 :]
    with pytest.raises(ValueError, match="alignment 0 is not a power of two"):
        gguf_architecture(damaged(tmp_path, bad, "alignment.gguf"))


def test_parsed_once_shares_readers_and_undoes_itself(tmp_path):
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    path = tmp_path / "model.gguf"
    write_gguf(path)
    originals = (gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint)
    with pytest.raises(RuntimeError, match="a load that fails"):
        with parsed_once():
            first = gguf.GGUFReader(str(path))
            assert gguf.GGUFReader(path) is first
            with parsed_once():  # nested: still one reader, and the outer stand-ins back after it
                assert gguf.GGUFReader(str(path)) is first
            assert gguf.GGUFReader(str(path)) is first and gguf.GGUFReader is not originals[0]
            raise RuntimeError("a load that fails")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint) == originals
