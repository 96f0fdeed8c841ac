"""The serving engine on the GPU: pipelined steps (launched before the previous tokens are read), CUDA-graph
decode, chunked prefill and the batched sampler, held against HF forwards of the same bf16 model."""

from __future__ import annotations

import random

import pytest
import torch

from compiled_llm import LLM, SamplingParams
from tests.test_gpu_model import BACKENDS, random_llama, skip_without

pytestmark = pytest.mark.gpu
VOCAB = 4096


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request):
    skip_without(request.param)
    # 64-token steps, 8 sequences: 24 prompts need chunked prefill, mixed steps and decode graphs.
    return LLM(random_llama("hd128-gqa4"), attention_backend=request.param, max_batch_size=8, max_num_tokens=64,
               max_seq_len=256, num_kv_blocks=128, cuda_graph_batch_sizes=(1, 2, 4, 8))  # fmt: skip


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 90))] for _ in range(count)]


def hf_log_probs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V] log-probabilities HF gives each output position, teacher-forced, in float32."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output], device="cuda"), use_cache=False).logits[0].float()
    return logits[len(prompt) - 1 : -1].log_softmax(-1)


def assert_greedy(model, prompt: list[int], output: list[int], tolerance: float = 0.1) -> None:
    """Each token is HF's argmax at its position, up to bf16 near-ties (a wrong KV entry or a token fed from
    the wrong row gives logits far from HF's)."""
    log_probs = hf_log_probs(model, prompt, output)
    chosen = log_probs.gather(1, torch.tensor(output, device="cuda")[:, None])[:, 0]
    gap = log_probs.max(-1).values - chosen
    assert gap.max() < tolerance, (gap, output)


def test_greedy_engine_tokens_are_the_models_argmax(llm):
    graphs = llm.engine.runner.cuda_graphs
    replays = graphs.replays
    batch = prompts(24, seed=1)
    outputs = llm.generate(batch, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(batch, outputs):
        assert len(output.outputs[0].token_ids) == 20 and output.outputs[0].finish_reason == "length"
        assert_greedy(llm.model, prompt, output.outputs[0].token_ids)
    assert graphs.replays - replays > 20  # decode steps ran as CUDA graphs
    assert llm.engine.runner.kv_cache.allocator.num_free == 128 and not llm.engine.has_work


def test_a_stop_token_ends_its_request_exactly_there(llm):
    batch = prompts(6, seed=2)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    free = llm.generate(batch, greedy, use_tqdm=False)[0].outputs[0].token_ids
    end = next(i for i in range(4, 16) if free[i] not in free[:i]) + 1  # its first occurrence, mid-run
    # Only request 0 stops: the batch is the same as in the free run until then, and so are its numerics.
    params = [greedy.model_copy(update={"stop_token_ids": [free[end - 1]]})] + [greedy] * 5
    stopped = llm.generate(batch, params, use_tqdm=False)
    assert stopped[0].outputs[0].token_ids == free[:end] and stopped[0].outputs[0].finish_reason == "stop"
    assert llm.engine.runner.kv_cache.allocator.num_free == 128


def test_mixed_sampling_parameters_in_one_batch(llm):
    batch = prompts(8, seed=3)
    params = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, min_p=0.05, seed=6, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=1.2, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, frequency_penalty=0.4, ignore_eos=True, logprobs=0),
        SamplingParams(max_tokens=12, temperature=0.7, seed=7, ignore_eos=True, logprobs=1),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
    ]
    first = llm.generate(batch, params, use_tqdm=False)
    for p, output in zip(params, first):
        assert len(output.outputs[0].token_ids) == p.max_tokens
    assert_greedy(llm.model, batch[0], first[0].outputs[0].token_ids)
    assert_greedy(llm.model, batch[7], first[7].outputs[0].token_ids)
    for i in (0, 5, 6):  # logprobs: HF's log-softmax of the raw logits, within bf16 error
        output = first[i].outputs[0]
        reference = hf_log_probs(llm.model, batch[i], output.token_ids)
        for step, (token, entry) in enumerate(zip(output.token_ids, output.logprobs)):
            assert token in entry and len(entry) <= params[i].logprobs + 1
            for candidate, value in entry.items():
                assert value == pytest.approx(float(reference[step, candidate]), abs=0.1)
    assert first[1].outputs[0].token_ids != first[2].outputs[0].token_ids


def test_cancelled_stream_frees_its_blocks(llm):
    import asyncio

    async def run():
        stream = llm.generate_async(prompts(1, seed=4)[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        count = 0
        async for _ in stream:
            count += 1
            if count == 3:
                break
        await stream.aclose()

    asyncio.run(run())
    assert llm.engine.runner.kv_cache.allocator.num_free == 128 and not llm.engine.has_work
