"""The engine in its own process (compiled_llm/engine_core/): what EngineCoreClient.generate_async gives equals
LLM.generate in this process on the same model, leaving early frees the request's blocks in the core, and a
core that cannot start or dies is an error here, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from compiled_llm import LLM, SamplingParams
from compiled_llm.engine_core import EngineCoreClient

CONFIG = {"max_batch_size": 8, "max_seq_len": 96, "num_kv_blocks": 48, "compile_backend": "eager"}
PROMPTS = ["The quick brown", "Zwölf Box", "日本語の", "Portez ce vieux", "Sylter Deich"]


@pytest.fixture(scope="module")
def core(text_model_dir):
    client = EngineCoreClient.start(str(text_model_dir), **CONFIG)
    yield client
    client.close()
    assert client.process.exitcode == 0  # SHUTDOWN ends it cleanly


@pytest.fixture(scope="module")
def local(text_model_dir):
    return LLM(str(text_model_dir), **CONFIG)


async def collect(client, prompt, params):
    """Every output the request streamed, the finished one last."""
    async with contextlib.aclosing(client.generate_async(prompt, params)) as outputs:
        return [output async for output in outputs]


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_outputs_equal_the_engine_in_this_process(core, local):
    """Greedy, a stop string, logprobs and a seeded sampled request, all at once: the same tokens, text, finish
    reasons and logprobs as LLM.generate here; what streamed grows into the final output."""
    unstopped = local.generate(PROMPTS[1], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].text  # fmt: skip
    params = [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[unstopped[12:14]]),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0),
    ]
    expected = local.generate(PROMPTS, params, use_tqdm=False)

    async def run_all():
        return await asyncio.gather(*(collect(core, p, s) for p, s in zip(PROMPTS, params)))

    for streamed, want in zip(asyncio.run(run_all()), expected):
        final, want = streamed[-1].outputs[0], want.outputs[0]
        assert streamed[-1].finished and not any(o.finished for o in streamed[:-1])
        assert (final.token_ids, final.text, final.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        if want.logprobs is not None:
            assert [sorted(e) for e in final.logprobs] == [sorted(e) for e in want.logprobs]
            for got, ref in zip(final.logprobs, want.logprobs):
                assert all(abs(got[t] - ref[t]) < 1e-4 for t in ref)
        for earlier in streamed[:-1]:
            out = earlier.outputs[0]
            assert final.token_ids[: len(out.token_ids)] == out.token_ids and final.text.startswith(out.text)
    assert expected[1].outputs[0].finish_reason == "stop"  # the stop string was met, not only the length


def test_a_caller_that_leaves_frees_its_blocks_in_the_core(core):
    async def leave_after_two():
        outputs = core.generate_async(PROMPTS[0], SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
        async with contextlib.aclosing(outputs):
            for _ in range(2):
                await anext(outputs)

    asyncio.run(leave_after_two())
    wait_for(lambda: core.stats().kv_blocks_used == 0 and core.stats().running == 0 and core.num_waiting == 0)


def test_a_request_that_cannot_fit_is_refused_before_it_is_sent(core):
    sent = core._sent

    async def too_long():
        await anext(core.generate_async(list(range(1, 90)), SamplingParams(max_tokens=20)))

    with pytest.raises(ValueError, match="max_seq_len=96"):
        asyncio.run(too_long())
    assert core._sent == sent


def test_a_core_that_cannot_start_raises_its_error(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        EngineCoreClient.start(str(tmp_path / "nope"), **CONFIG)


def test_a_core_that_dies_fails_its_requests(text_model_dir):
    client = EngineCoreClient.start(str(text_model_dir), **CONFIG)

    async def run_then_kill():
        outputs = client.generate_async(PROMPTS[1], SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
        async with contextlib.aclosing(outputs):
            await anext(outputs)
            os.kill(client.process.pid, signal.SIGKILL)
            async for _ in outputs:
                pass

    try:
        with pytest.raises(RuntimeError, match="engine core process exited"):
            asyncio.run(run_then_kill())
        assert client.engine_failure is not None
    finally:
        client.close()
