"""AWQ and GPTQ checkpoints (compiled_llm/int4_checkpoint.py): the packings pinned by hand-worked words (neither AutoAWQ
nor AutoGPTQ runs on a CPU), tiny checkpoints written in each layout loading with their codes kept, compiled under
quantization="auto" against HF's forward over the same dequantized weights, and the variants refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_prompt, tiny_model
from safetensors.torch import save_file

from compiled_llm import compile_model
from compiled_llm.int4_checkpoint import int4_checkpoint_format, unpack_awq, unpack_gptq
from compiled_llm.model_source import load_model
from custom_ops.linear.int4 import dequantize, quantize_weight, unpack_codes

WORD = 0x87654321 - 2**32  # nibble i (bits 4i..4i+3) holds i + 1, as an int32
SHAPES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
GROUP = 64


def test_an_awq_word_holds_its_channels_in_awq_order():
    """AutoAWQ packs channels [0, 2, 4, 6, 1, 3, 5, 7] into nibbles 0..7 (its AWQ_ORDER; unpacking reads them back
    through AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7]): nibble values 1..8 are channels 0..7's 1, 5, 2, 6, 3, 7, 4,
    8. One input row, one group."""
    words = torch.tensor([[WORD]], dtype=torch.int32)
    codes, zeros = unpack_awq(words, words)
    assert codes.tolist() == [[1], [5], [2], [6], [3], [7], [4], [8]]  # [N = 8, K = 1]
    assert zeros.flatten().tolist() == [1, 5, 2, 6, 3, 7, 4, 8]


def test_a_gptq_word_holds_eight_input_columns_in_order_and_zeros_minus_one():
    """GPTQ packs qweight along the input: nibble i of word r is column 8r + i; qzeros along the output, nibble i
    channel 8c + i, storing z - 1 (AutoGPTQ) or z (gptq_v2)."""
    words = torch.tensor([[WORD]], dtype=torch.int32)
    codes, _ = unpack_gptq(words, torch.zeros(1, 1, dtype=torch.int32), 1)
    assert codes.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]  # [N = 1, K = 8]
    zeros_word = torch.tensor([[0x76543210]], dtype=torch.int32)
    _, zeros = unpack_gptq(torch.zeros(1, 8, dtype=torch.int32), zeros_word, 1)
    assert zeros.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    _, zeros = unpack_gptq(torch.zeros(1, 8, dtype=torch.int32), zeros_word, 0)
    assert zeros.flatten().tolist() == list(range(8))


def pack_nibbles(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """int [..., 8 W] -> int32 [..., W]: nibble i of word w holds value 8w + order[i]."""
    grouped = values.to(torch.int64).view(*values.shape[:-1], -1, 8)
    word = sum(grouped[..., j] << (4 * i) for i, j in enumerate(order))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


def write_checkpoint(path, method: str) -> tuple[torch.nn.Module, dict]:
    """A tiny Llama's linears (not the LM head) in 4 bits, written as an AutoAWQ GEMM or AutoGPTQ (v1) directory
    by this test's own packer; returns the float model and each linear's dequantized weight."""
    model = tiny_model("llama", **SHAPES)
    tensors, dequantized = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        qweight, scales, zeros = quantize_weight(module.weight, GROUP, scale_dtype=torch.float16)
        codes = unpack_codes(qweight)  # [N, K]
        dequantized[f"{name}.weight"] = dequantize(qweight, scales, zeros, GROUP)
        if method == "awq":
            tensors[f"{name}.qweight"] = pack_nibbles(codes.t(), (0, 2, 4, 6, 1, 3, 5, 7))  # [K, N/8]
            tensors[f"{name}.qzeros"] = pack_nibbles(zeros.t(), (0, 2, 4, 6, 1, 3, 5, 7))  # [K/G, N/8]
        else:
            tensors[f"{name}.qweight"] = pack_nibbles(codes).t().contiguous()  # [K/8, N]
            tensors[f"{name}.qzeros"] = pack_nibbles(zeros.t().to(torch.int64) - 1)  # [K/G, N/8], z - 1
            tensors[f"{name}.g_idx"] = torch.arange(module.in_features, dtype=torch.int32) // GROUP
        tensors[f"{name}.scales"] = scales.t().contiguous()
    for name, parameter in model.named_parameters():
        if name.removesuffix(".weight") + ".qweight" not in tensors:
            tensors[name] = parameter.detach().clone()
    save_file(tensors, str(path / "model.safetensors"))
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
        if method == "awq"
        else {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False}
    )
    (path / "config.json").write_text(json.dumps(config))
    return model, dequantized


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_checkpoint_loads_its_codes_and_compiles_to_hf_over_the_same_weights(method, tmp_path):
    _, dequantized = write_checkpoint(tmp_path, method)
    loaded = load_model(str(tmp_path), dtype=torch.float32, device="cpu").model
    expected = {"awq": "int4_awq", "gptq": "int4_gptq"}[method]
    assert loaded.compiled_llm_quantization == expected
    for name, weight in dequantized.items():  # the module runs as itself, over exactly the stored values
        assert torch.equal(loaded.get_parameter(name), weight)
    compiled = compile_model(loaded, compile_backend="eager", max_batch_size=2, max_seq_len=64, cache_dir=tmp_path,
                             verify=True)  # fmt: skip
    assert compiled.config.quantization == expected
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert result.sites == 4 * loaded.config.num_hidden_layers and "as stored" in result.detail
    assert not (tmp_path / "awq").exists()  # nothing calibrated
    ids = random_prompt(11)
    with torch.no_grad():
        reference = loaded(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "desc_act true"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8-bit"),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size -1"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
    ],
)
def test_unsupported_variants_are_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message):
        int4_checkpoint_format(config)


def test_act_order_gptq_g_idx_is_refused(tmp_path):
    write_checkpoint(tmp_path, "gptq")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj.g_idx does not put column k in group"):
        load_model(str(tmp_path), dtype=torch.float32, device="cpu")


def test_int4_gptq_on_a_float_model_says_what_to_use(tmp_path):
    with pytest.raises(ValueError, match="quantization='int4_awq'"):
        compile_model(tiny_model("llama", **SHAPES), quantization="int4_gptq", compile_backend="eager",
                      max_seq_len=32, cache_dir=tmp_path)  # fmt: skip


def test_a_wrapped_autogptq_zero_reads_back_as_16_as_gptq_runtimes_compute_it():
    """AutoGPTQ stores z - 1; for z = 0 that is -1, whose nibble is 15, read back as 16. Kernels of AutoGPTQ, exllama
    and vLLM all compute (q - 16) s there, so that is what the checkpoint runs as, in the op's reference too."""
    from custom_ops.linear.int4 import int4_linear_reference, pack_codes

    _, zeros = unpack_gptq(torch.zeros(1, 8, dtype=torch.int32), torch.tensor([[-1]], dtype=torch.int32), 1)
    assert zeros.flatten().tolist() == [16] * 8
    codes = torch.full((8, 16), 3, dtype=torch.uint8)
    out = int4_linear_reference(torch.ones(1, 16), pack_codes(codes), torch.ones(8, 1), zeros.to(torch.uint8), None,
                                [], None, 16)  # fmt: skip
    assert out.flatten().tolist() == [(3 - 16) * 16.0] * 8
