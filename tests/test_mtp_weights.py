"""Multi-token-prediction layers (compiled_llm/mtp_weights.py): found past the last decoder layer, read as stored,
carried by `convert`, set aside by the FP8 loader. The checkpoints are written here as DeepSeek-V3's are laid out:
one more `model.layers.<num_hidden_layers>.*` layer, with the MTP projection and norms beside its decoder weights."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compiled_llm.model_source import convert_model, load_model
from compiled_llm.mtp_weights import load_mtp_weights
from conftest import tiny_model
from test_fp8_checkpoint import write_checkpoint


def _with_an_mtp_layer(directory, arch: str, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint of `arch` (2 decoder layers) written from a 3-layer model whose config then says 2: its third
    layer, plus an eh_proj and an enorm, are the MTP layer (model.layers.2.*). Returns the MTP tensors as stored."""
    model = tiny_model(arch)
    model.config.num_hidden_layers = 3
    three = type(model)(model.config).eval()
    three.model.layers[:2].load_state_dict(model.model.layers.state_dict())
    three.load_state_dict({**three.state_dict(), **{k: v for k, v in model.state_dict().items() if "layers" not in k}})
    if fmt:
        write_checkpoint(three, directory, fmt)
    else:
        three.save_pretrained(directory, max_shard_size="40KB")  # sharded, with an index, as large checkpoints are
    extra = {"model.layers.2.eh_proj.weight": torch.randn(64, 128), "model.layers.2.enorm.weight": torch.rand(64)}
    save_file(extra, directory / "model-extra.safetensors")
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"].update(dict.fromkeys(extra, "model-extra.safetensors"))
        index_path.write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    stored = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            stored.update({name: f.get_tensor(name) for name in f.keys() if name.startswith("model.layers.2.")})
    assert len(stored) > len(extra)
    return stored


def _assert_same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    assert all(actual[n].dtype == expected[n].dtype and torch.equal(actual[n], expected[n]) for n in expected)


def test_a_sharded_checkpoint_keeps_its_mtp_layer_loadable_through_convert(tmp_path):
    stored = _with_an_mtp_layer(tmp_path / "source", "deepseek_v3")
    _assert_same(load_mtp_weights(tmp_path / "source"), stored)
    loaded = load_model(str(tmp_path / "source"), torch.float32, "cpu")
    assert loaded.model.config.num_hidden_layers == 2 and len(loaded.model.model.layers) == 2
    convert_model(str(tmp_path / "source"), tmp_path / "converted", torch.float32)
    _assert_same(load_mtp_weights(tmp_path / "converted"), stored)
    reloaded = load_model(str(tmp_path / "converted"), torch.float32, "cpu").model
    torch.testing.assert_close(reloaded.model.layers[1].mlp.gate.weight, loaded.model.model.layers[1].mlp.gate.weight)


def test_an_fp8_checkpoint_sets_its_mtp_layer_aside(tmp_path):
    """The FP8 loader refuses tensors the model does not have; an MTP layer's are not refused, and stay float8."""
    stored = _with_an_mtp_layer(tmp_path, "llama", "hf_fp8")
    assert any(t.dtype == torch.float8_e4m3fn for t in stored.values())
    model = load_model(str(tmp_path), torch.float32, "cpu").model
    assert model.compiled_llm_quantization == "fp8_block" and len(model.model.layers) == 2
    _assert_same(load_mtp_weights(tmp_path), stored)
    assert load_mtp_weights(tmp_path, num_hidden_layers=3) == {}  # every layer the model's: none past it
