"""`LLM.generate` over the engine: continuous batching, chunked prefill, preemption, prefix caching and
sampling, each checked against HF `generate` on every prompt alone."""

from __future__ import annotations

import random

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from conftest import VOCAB, tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=[],
                             pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def prompts(count: int, seed: int, lengths=(3, 60)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(*lengths))] for _ in range(count)]


@pytest.fixture(scope="module")
def llm():
    """Steps of at most 32 tokens and 8 sequences: 24 prompts need continuous batching and chunked prefill."""
    return LLM(tiny_model("llama"), max_num_tokens=32, max_batch_size=8, max_seq_len=128, num_kv_blocks=96)


def test_24_mixed_prompts_give_hf_greedy_tokens(llm):
    batch = prompts(24, seed=1)
    outputs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == batch  # in order
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(llm.model, prompt, 12)
        assert output.outputs[0].finish_reason == "length" and output.finished
    assert llm.engine.runner.kv_cache.allocator.num_free == 96  # every block back (cached ones are free too)


def test_a_repeated_prompt_reuses_its_cached_blocks(llm):
    long_prompt = prompts(1, seed=2, lengths=(70, 70))[0]
    first, second = (llm.generate([long_prompt], GREEDY, use_tqdm=False)[0] for _ in range(2))
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64  # four full blocks of 16; the block of the last token is recomputed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy(llm.model, long_prompt, 12)


def test_warm_up_leaves_the_engine_as_it_found_it(monkeypatch):
    """Engine.warm_up (run by a server's engine core before its first request) fills a step with prompt tokens
    and a batch with sequences, then leaves no request, no held block and no count behind; greedy outputs after
    it are still HF's."""
    llm = LLM(tiny_model("llama"), max_num_tokens=32, max_batch_size=8, max_seq_len=128, num_kv_blocks=12,
              compile_backend="eager")  # fmt: skip
    shapes, schedule = [], llm.engine.scheduler.schedule

    def recording():
        scheduled = schedule()
        shapes.append((len(scheduled), sum(chunk.num_tokens for _, chunk in scheduled)))
        return scheduled

    monkeypatch.setattr(llm.engine.scheduler, "schedule", recording)
    llm.engine.warm_up()
    pool = llm.engine.scheduler.pool
    assert max(tokens for _, tokens in shapes) == 32 and max(seqs for seqs, _ in shapes) == 8
    assert not llm.engine.has_work and pool.num_free == 12
    assert (pool.hit_tokens, pool.queried_tokens, llm.engine.scheduler.num_preemptions) == (0, 0, 0)
    batch = prompts(4, seed=9)
    for prompt, output in zip(batch, llm.generate(batch, GREEDY, use_tqdm=False)):
        assert output.outputs[0].token_ids == hf_greedy(llm.model, prompt, 12)


def test_preemption_when_blocks_run_out_keeps_the_results():
    """12 blocks of 16 tokens for 8 sequences that grow to ~60 tokens each: some must be preempted and
    recomputed, and every one still gets HF's tokens."""
    llm = LLM(tiny_model("qwen3"), max_num_tokens=64, max_batch_size=8, max_seq_len=96, num_kv_blocks=12,
              compile_backend="eager")  # fmt: skip
    batch = prompts(8, seed=3, lengths=(20, 40))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(llm.model, prompt, 24)


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    prompt = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = prompts(5, seed=5)
    mixed = llm.generate(others[:2] + [prompt] + others[2:], [GREEDY] * 2 + [params] + [GREEDY] * 3,
                         use_tqdm=False)  # fmt: skip
    assert mixed[2].outputs[0].token_ids == alone
    unseeded = [llm.generate([prompt], SamplingParams(max_tokens=10, temperature=5.0, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids for _ in range(3)]  # fmt: skip
    assert len({tuple(t) for t in unseeded}) > 1  # without a seed, sampling does vary


def test_stop_tokens_eos_and_max_tokens(llm):
    prompt = prompts(1, seed=6)[0]
    free = hf_greedy(llm.model, prompt, 12)
    stop = free[4]
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop]), use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"
    llm.engine.eos_token_ids = frozenset([stop])  # the model's EOS: stops unless ignore_eos
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"
    finally:
        llm.engine.eos_token_ids = frozenset()
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:3] and out.finish_reason == "length"


def test_abort_frees_blocks_at_once(llm):
    pool = llm.engine.runner.kv_cache.allocator
    free_before = pool.num_free
    request = llm.engine.add_request(prompts(1, seed=7)[0], GREEDY)
    llm.engine.step()
    assert pool.num_free < free_before
    llm.engine.abort(request)
    assert pool.num_free == free_before and request.finish_reason == "abort" and not llm.engine.has_work


def test_bad_requests_are_refused_before_any_work(llm):
    with pytest.raises(ValueError, match="exceeds the model's context of max_seq_len=128"):
        llm.generate([[5] * 120], SamplingParams(max_tokens=16), use_tqdm=False)
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 256\)"):
        llm.generate([[5, 999]], use_tqdm=False)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(best_of=2)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="top_k/top_p/min_p need temperature > 0"):
        SamplingParams(temperature=0, top_k=5)
    assert not llm.engine.has_work
