"""FP8 checkpoints (compiled_llm/fp8_checkpoint.py): each format detected from its config, loaded without
requantizing, run as the quantize_fp8 pass's op, and the compiled model's logits equal to the float model whose
linears compute with the checkpoint's own float8 weights and scales. quantization='auto' and bad combinations."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from compiled_llm import compile_model
from compiled_llm.model_source import load_model
from custom_ops.linear.fp8 import fp8_linear_reference
from custom_ops.linear.fp8_block import fp8_block_linear_reference

FP8_MAX = 448.0


def test_a_modelopt_weight_loads_as_written_by_hand(tmp_path):
    """Pinned by a hand-worked example of ModelOpt's per-tensor FP8 (W = W8 * weight_scale, weight_scale =
    amax / 448): W = [[1, -2], [0.5, 4]] x 8 columns has amax 4, so W8 = W * 112 = [[112, -224], [56, 448]], exact."""
    model = tiny_model("llama")
    write_checkpoint(model, tmp_path, "modelopt")
    rows = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).repeat(1, 32)  # [2, 64]: o_proj's first two rows
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        name = "model.layers.0.self_attn.o_proj"
        weight8, scale = f.get_tensor(f"{name}.weight").clone(), f.get_tensor(f"{name}.weight_scale")
    weight8[:2] = torch.tensor([[112.0, -224.0], [56.0, 448.0]]).repeat(1, 32).to(torch.float8_e4m3fn)
    weight8[2:] = (weight8[2:].float() * (4.0 / FP8_MAX) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    tensors = _tensors(tmp_path)
    tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = weight8, torch.tensor(4.0 / FP8_MAX)
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_model(str(tmp_path), torch.float32, "cpu").model
    weight = loaded.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(weight[:2], rows)  # dequantized: the module runs as itself
    assert torch.equal(weight.fp8_weight[:2].float(), weight8[:2].float())
    assert torch.equal(weight.fp8_scale, torch.full((64,), 4.0 / FP8_MAX))  # the tensor's scale for every row


def _tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def write_checkpoint(model, directory, fmt: str) -> None:
    """`model` saved with its decoder linears in float8 as `fmt` stores them: `modelopt` (a scale per tensor, plus a
    static input scale), `hf_fp8` (DeepSeek-V3's weight_scale_inv per 128 x 128 block), written here from each
    format's description (W = W8 * scale)."""
    model.save_pretrained(directory, safe_serialization=True)
    tensors = _tensors(directory)
    for name in [n for n in tensors if n.endswith("_proj.weight") and ".layers." in n]:
        weight, prefix = tensors[name].float(), name.removesuffix(".weight")
        if fmt == "modelopt":
            scale = weight.abs().max() / FP8_MAX
            tensors[name] = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.input_scale"] = scale, torch.tensor(0.01)
        else:
            n, k = weight.shape
            scale = torch.stack([torch.stack([weight[i : i + 128, j : j + 128].abs().max() / FP8_MAX
                                              for j in range(0, k, 128)]) for i in range(0, n, 128)])  # fmt: skip
            full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
            tensors[name] = (weight / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            tensors[f"{prefix}.weight_scale_inv"] = scale
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    if fmt == "modelopt":
        (directory / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))  # fmt: skip
    else:
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": [128, 128]}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))


def checkpoint_reference_logits(model, directory, ids: torch.Tensor) -> torch.Tensor:
    """The float model with each decoder linear computing from the float8 weight and scale read back from the file
    (the ops' references): what the compiled checkpoint should give. A 2-D scale is per 128 x 128 block, one of
    N or 1 values per channel or tensor."""
    tensors = _tensors(directory)
    originals = {}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and f"{name}.weight" in tensors and name != "lm_head"):
            continue
        if tensors[f"{name}.weight"].dtype != torch.float8_e4m3fn:  # a linear the checkpoint keeps in float
            continue
        weight8 = tensors[f"{name}.weight"]
        scale = tensors.get(f"{name}.weight_scale", tensors.get(f"{name}.weight_scale_inv")).float()
        if scale.dim() == 2 and scale.shape[1] > 1 or f"{name}.weight_scale_inv" in tensors:
            forward = lambda x, w=weight8, s=scale, m=module: fp8_block_linear_reference(x, w, s, m.bias)
        else:
            scale = scale.reshape(-1).expand(weight8.shape[0]).contiguous()
            forward = lambda x, w=weight8, s=scale, m=module: fp8_linear_reference(x, w, s, None, m.bias)
        originals[module] = module.forward
        module.forward = forward
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for module in originals:
            del module.forward


CASES = {  # format: (the quantization it runs as, quantize_fp8's sites over 2 layers)
    "modelopt": ("fp8", 8),
    "hf_fp8": ("fp8_block", 12),  # 64-wide q and 32-row k, v: a 128-row block would span two of them, kept apart
    "compressed-tensors-channel": ("fp8", 8),
    "compressed-tensors-tensor": ("fp8", 8),
    "compressed-tensors-block": ("fp8_block", 12),  # 64-row k and v apart from q
    "compressed-tensors-channel-one-float": ("fp8", 7),  # layer 1's down_proj left in float: it stays float
}
FLOAT_IN_THE_CHECKPOINT = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_a_checkpoint_runs_its_own_float8_weights(tmp_path, fmt):
    quantization, expected_sites = CASES[fmt]
    if fmt.startswith("compressed-tensors"):
        fp8_checkpoints = pytest.importorskip("fp8_checkpoints")  # needs the compressed-tensors library
        model = fp8_checkpoints.tiny_llama()
        strategy, ignore = fmt.split("-")[2], ("lm_head", *([FLOAT_IN_THE_CHECKPOINT] if "float" in fmt else []))
        fp8_checkpoints.write_compressed_tensors_fp8(copy.deepcopy(model), str(tmp_path), strategy, ignore)
    else:
        model = tiny_model("llama")
        write_checkpoint(model, tmp_path, fmt)
    loaded = load_model(str(tmp_path), torch.float32, "cpu").model
    assert loaded.compiled_llm_quantization == quantization
    compiled = compile_model(loaded, compile_backend="eager")  # quantization="auto"
    assert compiled.config.quantization == quantization
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_fp8"]
    assert result.sites == expected_sites
    if "float" in fmt:
        assert "1 linears the checkpoint stores in float" in result.detail
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    expected = checkpoint_reference_logits(model, tmp_path, ids)
    with torch.no_grad():
        float_logits, logits = model(ids).logits, compiled(ids).logits
    distance = lambda a: ((a - expected).norm() / expected.norm()).item()
    assert distance(float_logits) > 0.02  # the float8 weights move the logits: the check below can tell
    assert distance(logits) < 2e-3


def test_auto_is_none_for_a_float_checkpoint_and_a_contradiction_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "float")
    compiled = compile_model(load_model(str(tmp_path / "float"), torch.float32, "cpu").model, compile_backend="eager")
    assert compiled.config.quantization == "none"
    write_checkpoint(tiny_model("llama"), tmp_path / "fp8", "modelopt")
    loaded = load_model(str(tmp_path / "fp8"), torch.float32, "cpu").model
    with pytest.raises(ValueError, match="quantization='none' contradicts the checkpoint, whose weights are stored as 'fp8'"):
        compile_model(loaded, compile_backend="eager", quantization="none")
    with pytest.raises(ValueError, match="quantization='fp8_block' contradicts"):
        compile_model(loaded, compile_backend="eager", quantization="fp8_block")
    with pytest.raises(ValueError, match="quantize_lm_head=True needs a quantization; quantization='auto' found a float"):
        compile_model(tiny_model("llama"), compile_backend="eager", quantize_lm_head=True)


@pytest.mark.parametrize(("quantization_config", "named"), [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}, "format 'pack-quantized'"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, r"weight_block_size \[64, 64\]"),
    ({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}, "quant_algo 'W4A8_AWQ'"),
])  # fmt: skip
def test_an_unsupported_scheme_is_named_with_what_is_supported(tmp_path, quantization_config, named):
    tiny_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": quantization_config}))
    with pytest.raises(ValueError, match=f"{named}.*is not supported; supported: compressed-tensors"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_a_hugging_face_fp8_block_loads_as_written_by_hand(tmp_path):
    """Pinned by a hand-worked example of DeepSeek-V3's layout (`weight_scale_inv` [N/128, K/128], W = W8 *
    weight_scale_inv per block): gate_proj [128, 64] is one block; with every value 0.25 except W[0, 0] = 2 the
    scale is 2/448 and W8 = W * 224 = 56 (and 448 at [0, 0]), exact."""
    model = tiny_model("llama")
    write_checkpoint(model, tmp_path, "hf_fp8")
    name = "model.layers.1.mlp.gate_proj"
    tensors = _tensors(tmp_path)
    assert tensors[f"{name}.weight_scale_inv"].shape == (1, 1)
    weight8 = torch.full((128, 64), 56.0)
    weight8[0, 0] = 448.0
    tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = weight8.to(torch.float8_e4m3fn), torch.tensor([[2 / 448]])
    save_file(tensors, tmp_path / "model.safetensors")
    weight = load_model(str(tmp_path), torch.float32, "cpu").model.model.layers[1].mlp.gate_proj.weight
    expected = torch.full((128, 64), 0.25)
    expected[0, 0] = 2.0
    torch.testing.assert_close(weight, expected)
    assert torch.equal(weight.fp8_weight.float(), weight8) and weight.fp8_scale.shape == (1, 1)


def test_a_float8_other_than_e4m3_is_refused_not_cast(tmp_path):
    """A weight stored as float8_e5m2 comes with scales this loader does not apply: casting it alone to the model's
    dtype would run a silently wrong weight, so the load names it and stops."""
    write_checkpoint(tiny_model("llama"), tmp_path, "modelopt")
    tensors = _tensors(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].float().to(torch.float8_e5m2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"{name} is stored as torch.float8_e5m2; FP8 checkpoints load float8_e4m3fn"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_the_generation_config_is_the_directorys_as_from_pretrained_reads_it(tmp_path):
    """generation_config.json (its EOS tokens, its sampling defaults) as from_pretrained reads it, whether the model
    loads whole or each rank reads its slices: the model built from config.json alone would stop at its one EOS token
    where the directory names more, and only over several ranks (meta_model.meta_model reads the file)."""
    write_checkpoint(tiny_model("llama"), tmp_path, "modelopt")
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 7]}))
    whole = load_model(str(tmp_path), torch.float32, "cpu").model
    sliced = load_model(str(tmp_path), torch.float32, "cpu", by_slices=True).model
    assert hasattr(sliced, "checkpoint_slices")
    assert whole.generation_config.eos_token_id == sliced.generation_config.eos_token_id == [2, 7]


def test_tied_weights_stored_with_different_values_are_refused(tmp_path):
    """An LM head tied to the embedding in config.json, yet stored with values of its own (transformers then unties
    them): copied into the one tied parameter, either would silently replace the other; refused, naming both. Stored
    alike, they load."""
    write_checkpoint(tiny_model("qwen3", tie_word_embeddings=True), tmp_path, "modelopt")
    tensors = _tensors(tmp_path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(str(tmp_path), torch.float32, "cpu").model
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    tensors["lm_head.weight"] = torch.randn_like(tensors["lm_head.weight"])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.embed_tokens.weight and lm_head.weight are tied .* different values"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_a_float8_tensor_of_three_dimensions_is_named(tmp_path):
    """Experts stored as one [E, N, K] float8 tensor: an error that names it, not an unpacking error."""
    write_checkpoint(tiny_model("llama"), tmp_path, "modelopt")
    tensors = _tensors(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].unsqueeze(0)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"{name} is a 3-D float8 tensor; FP8 checkpoints load 2-D"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_moe_experts_stored_one_float8_tensor_an_expert_are_named(tmp_path):
    """transformers merges per-expert tensors at load; the FP8 loader reads tensors as stored, so a MoE checkpoint's
    float8 experts are refused naming them (not a key mismatch)."""
    write_checkpoint(tiny_model("qwen3_moe"), tmp_path, "modelopt")
    with pytest.raises(ValueError, match=r"mlp\.experts\.0\.\w+_proj\.weight \(and \d+ more\) are MoE experts stored "
                                         "one float8 tensor an expert"):  # fmt: skip
        load_model(str(tmp_path), torch.float32, "cpu")
