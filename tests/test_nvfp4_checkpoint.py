"""NVFP4 checkpoints (compiled_llm/nvfp4_checkpoint.py), each written by its format's own library on the CPU: a
compressed-tensors one (its NVFP4A16 scheme and compressor, as llm-compressor saves it) held to transformers' own
loading of it, and a ModelOpt one (mtq.quantize with NVFP4_DEFAULT_CFG, export_hf_checkpoint) held to ModelOpt's
dequantization of its tensors; both compiled under quantization="auto" with the stored codes kept, and variants
refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model
from compiled_llm.model_source import load_model
from compiled_llm.nvfp4_checkpoint import nvfp4_checkpoint_format

FIELDS = {"compile_backend": "eager", "max_batch_size": 2, "max_seq_len": 64}


@pytest.fixture(scope="module")
def compressed_tensors_dir(tmp_path_factory):
    """A tiny Llama quantized by compressed-tensors' NVFP4A16 preset (scales from its own qparams helpers) and saved
    compressed (nvfp4-pack-quantized), the LM head left in float."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp, generate_gparam

    model = tiny_model("llama")
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_global_scale"):
            weight = module.weight.detach()
            global_scale = generate_gparam(weight.min(), weight.max())
            scale, _ = compute_dynamic_scales_and_zp(weight, scheme.weights, module, global_scale=global_scale)
            module.weight_global_scale.data.copy_(global_scale)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
    compressor = ct.compressors.ModelCompressor.from_pretrained_model(model, quantization_format="nvfp4-pack-quantized")
    compressor.compress_model(model)
    path = tmp_path_factory.mktemp("ct_nvfp4")
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


@pytest.fixture(scope="module")
def modelopt_dir(tmp_path_factory):
    """A tiny Llama quantized by ModelOpt (NVFP4_DEFAULT_CFG, calibrated on random tokens) and exported as a Hugging
    Face checkpoint (hf_quant_config.json, weight / weight_scale / weight_scale_2 / input_scale)."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint

    model = tiny_model("llama")
    model.config.architectures = ["LlamaForCausalLM"]  # what a model from from_pretrained has; the export reads it
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(ids))
    path = tmp_path_factory.mktemp("modelopt_nvfp4")
    export_hf_checkpoint(model, export_dir=path)
    return path


def test_compressed_tensors_loads_as_transformers_dequantizes_it(compressed_tensors_dir):
    """bfloat16 (compressed-tensors dequantizes in bfloat16): every weight equal to transformers' own loading of the
    checkpoint (CompressedTensorsConfig(dequantize=True)), and the same logits."""
    import transformers as tf

    theirs = tf.AutoModelForCausalLM.from_pretrained(
        compressed_tensors_dir, dtype=torch.bfloat16, quantization_config=tf.CompressedTensorsConfig(dequantize=True)
    ).eval()
    ours = load_model(str(compressed_tensors_dir), device="cpu", dtype=torch.bfloat16).model
    assert ours.compiled_llm_quantization == "nvfp4"
    their_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, their_state[name]), name
    stored = ours.model.layers[0].self_attn.q_proj.weight.nvfp4_tensors
    assert stored[0].dtype == torch.uint8 and stored[1].dtype == torch.float8_e4m3fn and stored[2].shape == (64,)
    ids = random_prompt(10)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_modelopt_loads_as_modelopt_dequantizes_it(modelopt_dir):
    """Each quantized weight equal to ModelOpt's NVFP4QTensor dequantization of its stored tensors (float32)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from safetensors.torch import load_file

    stored = load_file(modelopt_dir / "model.safetensors")
    ours = load_model(str(modelopt_dir), device="cpu", dtype=torch.float32).model
    names = [n.removesuffix("_scale_2") for n in stored if n.endswith(".weight_scale_2")]
    assert len(names) == 7 * ours.config.num_hidden_layers  # q, k, v, o, gate, up, down
    for name in names:
        codes = stored[name]
        packed = NVFP4QTensor((codes.shape[0], 2 * codes.shape[1]), torch.float32, codes)
        expected = packed.dequantize(torch.float32, scale=stored[f"{name}_scale"],
                                     double_scale=stored[f"{name}_scale_2"], block_sizes={-1: 16})  # fmt: skip
        assert torch.equal(ours.get_parameter(name), expected), name


@pytest.mark.parametrize("fixture", ["compressed_tensors_dir", "modelopt_dir"])
def test_auto_runs_the_stored_tensors(fixture, request, tmp_path):
    """quantization="auto" is nvfp4 for either checkpoint: every decoder linear from its stored tensors (q/k/v and
    gate/up fused with each part's global scale), the logits the module's (its weights the dequantized ones)."""
    model = load_model(str(request.getfixturevalue(fixture)), device="cpu", dtype=torch.float32).model
    compiled = compile_model(model, verify=True, cache_dir=tmp_path, **FIELDS)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_nvfp4"]
    assert result.sites == 4 * model.config.num_hidden_layers and "as stored" in result.detail
    ids = random_prompt(12)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="contradicts the checkpoint, whose weights are stored as 'nvfp4'"):
        compile_model(model, quantization="fp8", cache_dir=tmp_path, **FIELDS)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"quant_method": "modelopt", "quant_algo": "NVFP4_AWQ"}, "ModelOpt quant_algo 'NVFP4_AWQ'"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32}, "NVFP4 with group_size 32"),
        ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float", "group_size": 32, "symmetric": True}}}},
         "4-bit float weights in groups of 32"),
    ],
)  # fmt: skip
def test_unsupported_variants_are_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message):
        nvfp4_checkpoint_format(config)


def test_other_formats_are_not_nvfp4():
    assert nvfp4_checkpoint_format({"quant_method": "modelopt", "quant_algo": "FP8"}) is None
    assert nvfp4_checkpoint_format({"quant_method": "compressed-tensors", "format": "float-quantized"}) is None
    assert nvfp4_checkpoint_format(None) is None


def test_kv_cache_scales_are_set_aside(modelopt_dir, tmp_path):
    """ModelOpt writes k_proj.k_scale and v_proj.v_scale with kv_cache_quant_algo FP8: not used (the cache's scales
    are computed at run time), never a mismatch with the model."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(modelopt_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.v_proj.v_scale"] = torch.tensor(0.25)
    save_file(tensors, tmp_path / "model.safetensors")
    for name in ("config.json", "hf_quant_config.json"):
        (tmp_path / name).write_text((modelopt_dir / name).read_text())
    expected = load_model(str(modelopt_dir), device="cpu", dtype=torch.float32).model.state_dict()
    loaded = load_model(str(tmp_path), device="cpu", dtype=torch.float32).model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[n], expected[n]) for n in expected)


def test_a_missing_scale_is_named(compressed_tensors_dir, tmp_path):
    """A copy of the checkpoint without one linear's e4m3 scales: the error names the tensor."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(compressed_tensors_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((compressed_tensors_dir / "config.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format"] == "nvfp4-pack-quantized"
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight_packed has no .*up_proj.weight_scale"):
        load_model(str(tmp_path), device="cpu")


def test_a_nan_scale_is_refused_by_name(compressed_tensors_dir, tmp_path):
    """A copy with one NaN e4m3 scale (0x7F): the reference would give NaN, the kernels read it as 480; refused."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(compressed_tensors_dir / "model.safetensors")
    scales = tensors["model.layers.0.self_attn.o_proj.weight_scale"]
    scales.view(torch.uint8)[0, 0] = 0x7F
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((compressed_tensors_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.o_proj.weight_scale holds NaN scales"):
        load_model(str(tmp_path), device="cpu")


def test_a_config_that_says_nvfp4_over_float_weights_is_named(tmp_path):
    """config.json says ModelOpt NVFP4, the files hold float weights: an error, never the float weights run as if."""
    tiny_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="says ModelOpt NVFP4, but no tensor holds its codes"):
        load_model(str(tmp_path), device="cpu")
