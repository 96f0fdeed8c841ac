"""Text out of `LLM`: incremental detokenization, stop strings, n completions and `generate_async`
streaming and cancellation, on a tiny model with a byte-level BPE tokenizer trained here."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from compiled_llm import LLM, SamplingParams
from compiled_llm.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "日本語のテキストも少し入れておきます。絵文字も 😀🚀 です。",
    "Portez ce vieux whisky au juge blond qui fume, déjà.",
] * 20


def byte_level_tokenizer() -> tf.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def text_model() -> tuple[tf.LlamaForCausalLM, tf.PreTrainedTokenizerFast]:
    """A tiny random Llama over the byte-level tokenizer (which gets a chat template)."""
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # spread logits so that greedy picks are not near-ties
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    return model, tokenizer


@pytest.fixture(scope="module")
def llm():
    model, tokenizer = text_model()
    return LLM(model, tokenizer, max_num_tokens=64, max_batch_size=8, max_seq_len=160, num_kv_blocks=64,
               compile_backend="eager")  # fmt: skip


def test_incremental_text_never_splits_a_character():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("Zwölf Boxkämpfer 日本語 😀🚀 déjà")["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some characters do span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    final = tokenizer.decode(ids)
    for n in range(1, len(ids) + 1):
        detokenizer.update(ids[:n])
        assert "\ufffd" not in detokenizer.text and final.startswith(detokenizer.text)
    assert detokenizer.text == final


def test_stop_strings_cut_the_text_before_them(llm):
    prompt = "The quick brown"
    free = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    assert text == llm.tokenizer.decode(free.outputs[0].token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and len(text) > 10
    out = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=["@@never", stop]),
                       use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert out.text == text[: text.find(stop)] and out.finish_reason == "stop"
    assert len(out.token_ids) < 40


def test_n_completions_follow_their_seeds(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3, ignore_eos=True)
    together = llm.generate("Portez ce", params, use_tqdm=False)[0]
    assert [o.index for o in together.outputs] == [0, 1, 2]
    for i, output in enumerate(together.outputs):
        alone = llm.generate("Portez ce", params.model_copy(update={"n": 1, "seed": 7 + i}), use_tqdm=False)[0]
        assert output.token_ids == alone.outputs[0].token_ids and output.text == alone.outputs[0].text


def test_generate_async_streams_the_same_text(llm):
    prompts = ["The quick", "Zwölf Box", "日本語の", "Portez ce vieux"]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    async def stream(prompt):
        texts = []
        async for output in llm.generate_async(prompt, params):
            texts.append(output.outputs[0].text)
        return texts

    async def main():
        return await asyncio.gather(*(stream(p) for p in prompts))

    for texts, final in zip(asyncio.run(main()), expected):
        assert texts[-1] == final and len(texts) > 5
        assert all(final.startswith(t) for t in texts)  # each streamed text is a prefix of the final one


def test_leaving_a_stream_early_frees_its_blocks(llm):
    pool = llm.engine.runner.kv_cache.allocator
    free_before = pool.num_free

    async def main():
        seen = 0
        async for output in llm.generate_async("The quick brown fox", SamplingParams(max_tokens=100, ignore_eos=True)):
            seen += 1
            if seen == 3:
                assert pool.num_free < free_before
                break
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(main()) == 3
    assert pool.num_free == free_before and not llm.engine.has_work
    with pytest.raises(ValueError, match="n must be 1"):
        asyncio.run(anext(llm.generate_async("x", SamplingParams(n=2))))


def test_stop_strings_need_a_tokenizer():
    from conftest import tiny_model

    bare = LLM(tiny_model("llama"), max_batch_size=2, max_seq_len=64, compile_backend="eager")
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        bare.generate([[5, 6, 7]], SamplingParams(stop=["x"]), use_tqdm=False)
    assert bare.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].text is None


def test_a_failing_step_fails_its_requests_instead_of_hanging(llm, monkeypatch):
    pool = llm.engine.runner.kv_cache.allocator
    free_before = pool.num_free
    step = llm.engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return step()

    monkeypatch.setattr(llm.engine, "step", failing_step)

    async def consume(prompt):
        return [o async for o in llm.generate_async(prompt, SamplingParams(max_tokens=30, ignore_eos=True))]

    async def main():
        return await asyncio.gather(consume("The quick"), consume("Portez ce"), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "the engine failed" in str(r) for r in results)
    assert pool.num_free == free_before and not llm.engine.has_work
    monkeypatch.undo()
    assert len(asyncio.run(consume("The quick"))[-1].outputs[0].token_ids) == 30  # usable again
