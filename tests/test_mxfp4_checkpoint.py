"""MXFP4 checkpoints (compiled_llm/mxfp4_checkpoint.py): a tiny GPT-OSS checkpoint written here from the format's
description loads as a float model whose experts' parameters are transformers' own dequantization and carry the
stored bytes in the kernels' [E, N, K] orientation, which a row decoded by hand pins; experts lacking their
scales, and an MXFP4 config on another architecture, are errors naming what is wrong."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from compiled_llm.fp8_checkpoint import resolve_quantization
from compiled_llm.model_source import load_model

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # the magnitudes of the 3 low bits; bit 3 is the sign
# The real checkpoints' (openai/gpt-oss-20b): everything but the experts is plain.
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
EXPERTS = (".experts.gate_up_proj", ".experts.down_proj")


def write_checkpoint(directory, sharded: bool = False) -> dict[str, torch.Tensor]:
    """tiny_model("gpt_oss") saved as GPT-OSS stores it: the experts' weights as random MXFP4 `_blocks` (any byte is
    two valid e2m1 values) and `_scales` (e8m0 2^-9 .. 2^3), the rest in bf16. Returns the stored tensors; the
    first gate_up_proj byte is 0x2F at scale 2^1, the example test_one_byte_decodes_as_written reads."""
    tiny_model("gpt_oss").save_pretrained(directory, max_shard_size="100KB" if sharded else "50GB")
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if sharded else None
    generator = torch.Generator().manual_seed(0)
    stored = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(file).items()}
        for name in [n for n in tensors if n.endswith(EXPERTS)]:
            experts, k, n = tensors.pop(name).shape  # GptOssExperts computes x @ W: [E, K, N]
            blocks = torch.randint(0, 256, (experts, n, k // 32, 16), generator=generator, dtype=torch.uint8)
            scales = torch.randint(118, 131, (experts, n, k // 32), generator=generator, dtype=torch.uint8)
            if name.endswith("gate_up_proj"):
                blocks[0, 0, 0, 0], scales[0, 0, 0] = 0x2F, 128
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            if sharded:
                del weight_map[name]
                weight_map[f"{name}_blocks"] = weight_map[f"{name}_scales"] = file.name
        save_file(tensors, file, metadata={"format": "pt"})
        stored.update(tensors)
    if sharded:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (directory / "config.json").write_text(json.dumps(config))
    return stored


def decoded_row(row_bytes: torch.Tensor, row_scales: torch.Tensor) -> list[float]:
    """One output row of MXFP4 decoded from its description: byte j holds elements 2j (low nibble) and 2j + 1 (high
    nibble) of group j // 16, whose scale byte s means 2^(s - 127)."""
    values = []
    for j, byte in enumerate(row_bytes.tolist()):
        for nibble in (byte & 0xF, byte >> 4):
            sign = -1.0 if nibble & 0x8 else 1.0
            values.append(sign * E2M1[nibble & 0x7] * 2.0 ** (row_scales[j // 16].item() - 127))
    return values


@pytest.mark.parametrize("dtype, sharded", [(torch.float32, False), (torch.bfloat16, True)])
def test_experts_load_dequantized_carrying_their_bytes(tmp_path, dtype, sharded):
    stored = write_checkpoint(tmp_path, sharded)
    model = load_model(str(tmp_path), dtype, "cpu").model
    assert model.compiled_llm_quantization == "mxfp4"
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert resolve_quantization("auto", model, False) == ("mxfp4", "auto: a checkpoint stored as 'mxfp4'")
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            blocks, scales = stored[f"{name}_blocks"], stored[f"{name}_scales"]
            experts, n, groups, _ = blocks.shape
            parameter = getattr(layer.mlp.experts, proj)
            assert parameter.dtype == dtype
            assert torch.equal(parameter, convert_moe_packed_tensors(blocks, scales, dtype=dtype))
            assert parameter.mxfp4_blocks.dtype == parameter.mxfp4_scales.dtype == torch.uint8
            assert parameter.mxfp4_blocks.is_contiguous() and parameter.mxfp4_scales.is_contiguous()
            assert torch.equal(parameter.mxfp4_blocks, blocks.reshape(experts, n, groups * 16))
            assert torch.equal(parameter.mxfp4_scales, scales)
        assert torch.equal(layer.mlp.router.weight, stored[f"model.layers.{i}.mlp.router.weight"].to(dtype))
    assert torch.isfinite(model(torch.arange(3, 11)[None]).logits).all()


def test_one_byte_decodes_as_written(tmp_path):
    """Pinned by hand: gate_up_proj's first byte 0x2F at scale byte 128 (2^1) holds e2m1 0xF = -6 then 0x2 = 1,
    inputs 0 and 1 of output 0, i.e. W[0, 0] = -12 and W[1, 0] = 2 in the module's [E, K, N]; and one whole row of
    each projection decoded from its bytes is that output's column of the parameter."""
    stored = write_checkpoint(tmp_path)
    layers = load_model(str(tmp_path), torch.float32, "cpu").model.model.layers
    gate_up, experts = layers[0].mlp.experts.gate_up_proj, layers[1].mlp.experts
    assert gate_up[0, 0, 0].item() == -12.0 and gate_up[0, 1, 0].item() == 2.0
    assert gate_up.mxfp4_blocks[0, 0, 0].item() == 0x2F and gate_up.mxfp4_scales[0, 0, 0].item() == 128
    for proj, (expert, row) in [("gate_up_proj", (3, 37)), ("down_proj", (2, 5))]:
        parameter = getattr(experts, proj)
        by_hand = decoded_row(parameter.mxfp4_blocks[expert, row], parameter.mxfp4_scales[expert, row])
        assert parameter[expert, :, row].tolist() == by_hand
        name = f"model.layers.1.mlp.experts.{proj}"  # and the attached bytes are the stored ones, read directly
        stored_row = stored[f"{name}_blocks"][expert, row].flatten(), stored[f"{name}_scales"][expert, row]
        assert by_hand == decoded_row(*stored_row)


def test_experts_without_scales_are_refused_by_name(tmp_path):
    write_checkpoint(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("lack model.layers.1.mlp.experts.down_proj_scales")):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_an_mxfp4_config_on_another_architecture_is_refused(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="an MXFP4 checkpoint of 'mixtral': MXFP4 experts are read for gpt_oss only"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_a_checkpoint_compiles_to_its_own_mxfp4_experts_and_matches_transformers(tmp_path, own_cache_dir):
    """End to end: the directory, loaded and compiled with quantization='auto', runs moe_experts_mxfp4 over the stored
    bytes and gives the logits of transformers' own model of the checkpoint (loaded by it, dequantized by it)."""
    import transformers as tf

    from compiled_llm import compile_model
    from conftest import random_prompt, relative_error

    write_checkpoint(tmp_path)
    compiled = compile_model(load_model(str(tmp_path), torch.float32, "cpu").model, max_batch_size=2, max_seq_len=64,
                             cache_dir=own_cache_dir)  # fmt: skip
    assert compiled.config.quantization == "mxfp4" and compiled.report.pass_sites("keep_mxfp4_experts") == 2
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                     quantization_config=tf.Mxfp4Config(dequantize=True)).eval()  # fmt: skip
    ids = random_prompt(16, batch=2, seed=6)
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
    assert relative_error(compiled(ids).logits, expected) < 1e-4
