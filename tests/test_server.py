"""`compiled-llm serve` as a real subprocess on a free port, over a tiny random model saved as an HF directory
with a locally trained tokenizer and a chat template, talked to with the official `openai` client. Expected
texts come from `LLM.generate` in this process on the same directory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from compiled_llm import LLM, SamplingParams

KEY = "test-key"
FLAGS = ["--compile-backend", "eager", "--max-batch-size", "16", "--max-num-tokens", "256", "--max-seq-len", "160",
         "--num-kv-blocks", "200", "--read-timeout", "1", "--max-request-bytes", "16MiB"]  # fmt: skip
PROMPTS = ["The quick brown", "Zwölf Box", "日本語の", "Portez ce vieux", "The lazy dog", "Sylter Deich"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local(text_model_dir):
    """The same model in this process: the reference outputs."""
    return LLM(str(text_model_dir), max_batch_size=16, max_seq_len=160, num_kv_blocks=200, compile_backend="eager")


def start_server(text_model_dir, tmp_path, *extra: str, new_session: bool = False) -> tuple[subprocess.Popen, str, object]:
    """`new_session`: in a process group of its own (as a server started from a terminal is in the terminal's)."""
    port = free_port()
    log = open(tmp_path / f"server-{port}.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "compiled_llm.cli", "serve", str(text_model_dir), "--port", str(port), "--api-key", KEY,
         "--served-model-name", "tiny", *FLAGS, *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        start_new_session=new_session,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, log
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start within 120 s")


def engine_core(pid: int) -> int:
    """The engine-core process of the server `pid`: its child spawned by multiprocessing (Linux /proc; the
    other child is multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat, command = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in command:
                found.append(int(entry.name))
    (core,) = found
    return core


@pytest.fixture(scope="module")
def server(text_model_dir, tmp_path_factory):
    process, url, log = start_server(text_model_dir, tmp_path_factory.mktemp("logs"))
    yield process, url, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)


def greedy(max_tokens: int = 20, **more) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **more)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def aborted(url: str) -> float:
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
             if line.startswith('compiled_llm_requests_total{finish_reason="abort"}')]  # fmt: skip
    return float(lines[0].split()[1]) if lines else 0.0


def test_completion_text_and_usage_are_the_engines(client, local):
    expected = local.generate(PROMPTS[0], greedy(), use_tqdm=False)[0]
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True})  # fmt: skip
    assert response.choices[0].text == expected.outputs[0].text and response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == 20 and response.usage.total_tokens == response.usage.prompt_tokens + 20
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_goes_through_the_chat_template(client, local):
    messages = [{"role": "system", "content": "Portez ce"}, {"role": "user", "content": "The quick brown fox"}]
    expected = local.generate([local.chat_prompt_ids(messages)], greedy(16), use_tqdm=False)[0].outputs[0].text
    response = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=16,
                                              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert response.choices[0].message.content == expected and response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(local.chat_prompt_ids(messages))


def test_streamed_text_equals_the_whole_text(client):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole and len(chunks) > 5
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[2]}],
                                               max_tokens=12, temperature=0, stream=True))  # fmt: skip
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")


def test_n_seeds_stop_strings_and_logprobs(client, local):
    two = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=10, n=2, seed=5, temperature=1.0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert sorted(c.index for c in two.choices) == [0, 1]
    alone = local.generate(PROMPTS[3], SamplingParams(max_tokens=10, seed=6, ignore_eos=True), use_tqdm=False)
    assert two.choices[1].text == alone[0].outputs[0].text  # completion 1 samples with seed + 1
    assert two.usage.completion_tokens == 20

    text = local.generate(PROMPTS[4], greedy(30), use_tqdm=False)[0].outputs[0].text
    stop = text[8:11]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]  # fmt: skip
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"

    scored = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=4, temperature=0, logprobs=2)
    lp = scored.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and lp.token_logprobs[0] == max(lp.top_logprobs[0].values())


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, 400, "max_seq_len=160"),
        ({"model": "gpt-5", "prompt": "x"}, 400, "does not exist"),
        ({"model": "tiny", "prompt": "The quick brown fox " * 40, "max_tokens": 4}, 400, "exceeds"),
        ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
        ({"model": "tiny", "prompt": [[]]}, 400, "empty"),
    ],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, status, needle):
    url = server[1]
    response = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health").status_code == 200


def test_malformed_json_and_missing_key(server):
    url = server[1]
    bad = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                               "Content-Type": "application/json"})  # fmt: skip
    assert bad.status_code == 400 and "error" in bad.json()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health").status_code == 200  # health and metrics need no key


def test_64_concurrent_streams_all_get_their_text(server, local):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(64)]
    expected = [o.outputs[0].text for o in local.generate(prompts, greedy(16), use_tqdm=False)]
    client = openai.AsyncOpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)

    async def stream(prompt: str) -> str:
        chunks = await client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def main():
        return await asyncio.gather(*(stream(p) for p in prompts))

    assert asyncio.run(main()) == expected


def test_bounded_load_keeps_health_answering(server, local):
    """128 concurrent streams, 16 of whose clients leave after their first token, and one 8 MiB prompt (under
    --max-request-bytes 16MiB): /health answers within 2 s throughout, the 8 MiB prompt gets
    context_length_exceeded, every stream that stays gets the text it gets alone."""
    url = server[1]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(128)]
    expected = [o.outputs[0].text for o in local.generate(prompts, greedy(16), use_tqdm=False)]
    headers = {"Authorization": f"Bearer {KEY}"}

    async def main():
        async with httpx.AsyncClient(headers=headers, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as http:  # fmt: skip

            async def stream(i: int) -> str | None:
                leaves = i % 8 == 0  # 16 clients leave after their first token, of 120 asked for
                body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 120 if leaves else 16, "temperature": 0,
                        "stream": True, "ignore_eos": True}  # fmt: skip
                text = []
                async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            text.append(json.loads(line[6:])["choices"][0]["text"])
                            if leaves:
                                return None
                return "".join(text)

            async def huge():
                body = {"model": "tiny", "prompt": "x" * (8 << 20), "max_tokens": 4}
                return await http.post(f"{url}/v1/completions", json=body)

            return await asyncio.gather(huge(), *(stream(i) for i in range(128)))

    done, health_s = threading.Event(), []

    def poll_health():  # its own thread and client: the streams' parsing must not delay the measurement
        while not done.is_set():
            start = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
            health_s.append(time.perf_counter() - start)
            time.sleep(0.1)

    aborted_before = aborted(url)
    poller = ThreadPoolExecutor(1).submit(poll_health)
    try:
        big, *texts = asyncio.run(main())
    finally:
        done.set()
    poller.result()
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
    assert health_s and max(health_s) < 2
    assert [t for i, t in enumerate(texts) if i % 8] == [e for i, e in enumerate(expected) if i % 8]
    deadline = time.time() + 10  # the leavers' requests are aborted (not run to their 120 tokens): blocks freed
    while (metric(url, "compiled_llm_kv_blocks_used") > 0 or aborted(url) < aborted_before + 16) and time.time() < deadline:
        time.sleep(0.05)
    assert metric(url, "compiled_llm_kv_blocks_used") == 0 and aborted(url) == aborted_before + 16


def test_a_client_that_disconnects_frees_its_blocks(server):
    url = server[1]
    before = aborted(url)
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        assert metric(url, "compiled_llm_kv_blocks_used") > 0
    deadline = time.time() + 10  # the abort lands after the engine step in progress
    while metric(url, "compiled_llm_kv_blocks_used") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(url, "compiled_llm_kv_blocks_used") == 0 and metric(url, "compiled_llm_requests_running") == 0
    assert aborted(url) == before + 1  # aborted, not run to its 150 tokens
    assert metric(url, "compiled_llm_generation_tokens_total") > 0
    assert "compiled_llm_time_to_first_token_seconds_bucket" in httpx.get(f"{url}/metrics").text


def test_a_non_streaming_client_that_leaves_is_aborted(server):
    """The engine core is paused (SIGSTOP) while the client leaves, so the request cannot finish first (150
    tokens of the tiny model take ~0.4 s, as long as the client's wait plus the server's disconnect check).
    Counted from before the request, so that it holds when run alone (the abort counter is shared)."""
    process, url, log = server
    before = aborted(url)
    core = engine_core(process.pid)
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 150, "ignore_eos": True}
    os.kill(core, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
        deadline = time.time() + 10
        while aborted(url) < before + 1 and time.time() < deadline:  # seen gone within the server's 0.25 s check
            time.sleep(0.05)
    finally:
        os.kill(core, signal.SIGCONT)
    deadline = time.time() + 10
    while metric(url, "compiled_llm_kv_blocks_used") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert aborted(url) == before + 1
    assert metric(url, "compiled_llm_kv_blocks_used") == 0 and metric(url, "compiled_llm_requests_running") == 0
    log.flush()
    log.seek(0)
    assert "Exception in ASGI application" not in log.read()  # the abort is not logged as a server error


def test_a_full_queue_gets_503_with_retry_after(local):
    from fastapi.testclient import TestClient

    from compiled_llm.server import build_app

    queued = local.engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))  # waits: nothing steps the engine
    try:
        with TestClient(build_app(local, "tiny", max_waiting=1)) as http:
            busy = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            too_many = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "n": 2})
    finally:
        local.engine.abort(queued)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "busy" in busy.json()["error"]["message"]
    assert too_many.status_code == 400 and "exceed the server's queue" in too_many.json()["error"]["message"]


def test_a_burst_beyond_max_waiting_gets_503s(text_model_dir, tmp_path, local):
    """40 requests at once against --max-waiting 4: accepted ones count as waiting before they reach the
    engine's queue (all 40 were admitted when only the engine's queue was counted)."""
    process, url, log = start_server(text_model_dir, tmp_path, "--max-waiting", "4")
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(40)]
    expected = [o.outputs[0].text for o in local.generate(prompts, greedy(8), use_tqdm=False)]

    async def burst():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            bodies = [{"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
                      for p in prompts]  # fmt: skip
            return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=b) for b in bodies))

    try:
        responses = asyncio.run(burst())
    finally:
        process.terminate()
        process.wait(timeout=60)
    busy = [r for r in responses if r.status_code == 503]
    done = [(i, r) for i, r in enumerate(responses) if r.status_code == 200]
    assert len(busy) + len(done) == 40 and busy and done
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "service_unavailable" for r in busy)
    assert all(r.json()["choices"][0]["text"] == expected[i] for i, r in done)


def test_bench_serving_drives_the_server(server, tmp_path):
    import json

    from compiled_llm.cli import main

    path = tmp_path / "serving.json"
    argv = ["bench", "--mode", "serving", "--url", server[1], "--api-key", KEY, "--num-requests", "8", "--input-len",
            "8", "--output-len", "6", "--concurrency", "1,4", "--vocab-size", "300", "--json", str(path)]  # fmt: skip
    assert main(argv) == 0
    runs = json.loads(path.read_text())["runs"]
    assert [r["concurrency"] for r in runs] == [1, 4]
    for run in runs:
        assert run["completed"] == 8 and run["failed"] == 0 and run["output_tokens"] == 48
        assert 0 < run["ttft_s"]["p50"] <= run["e2e_s"]["p50"] and run["itl_s"]["p50"] > 0


def test_a_stalled_upload_gets_408_after_the_read_timeout(server):
    url = server[1]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")  # fmt: skip
        reply = b""
        while chunk := conn.recv(65536):  # to the end: the 408 closes the connection
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in reply.replace(" ", "")
    assert httpx.get(f"{url}/health").status_code == 200


CHUNK_TEXTS = ["", "x", " Zwölf Box", "日本語の", "🙂 and 🚀", 'quote " backslash \\ slash /', "\t\n\r\x00\x1f\x7f",
               "\u2028\u2029\ufeff", "�"]  # fmt: skip


def test_stream_chunks_are_the_models_json_byte_for_byte():
    """What the stream sends for each token (responses.StreamChunks) is the text pydantic makes of the same chunk:
    keys, order, values and escapes; logprobs (with -inf) and finish reasons included."""
    from compiled_llm.server.responses import (
        ChatChunkChoice,
        ChatCompletionChunk,
        ChatDelta,
        CompletionChoice,
        CompletionResponse,
        StreamChunks,
        chat_logprobs,
        completion_logprobs,
    )  # fmt: skip

    def token_text(token: int) -> str:
        return CHUNK_TEXTS[token % len(CHUNK_TEXTS)]

    checked = 0
    for model in ("tiny", 'modèle/日本 "v2"'):
        for kind in ("completion", "chat"):
            chunks = StreamChunks(kind, "cmpl-0123abc", model)
            for index, text, tokens, reason, with_logprobs in [
                (0, t, ids, r, lp) for t in CHUNK_TEXTS for ids in ([], [5], [1, 2, 3]) for r in (None, "length", "stop")
                for lp in (False, True)
            ]:  # fmt: skip
                entries = [{t: -0.25, t + 1: -1.5e-7, t + 2: float("-inf")} for t in tokens] if with_logprobs else None
                if kind == "completion":
                    logprobs = completion_logprobs(tokens, entries, 2, 7, token_text)
                else:
                    logprobs = chat_logprobs(tokens, entries, 2, token_text)
                ours = chunks.chunk(index + 3, text, tokens, reason, logprobs)
                created = json.loads(ours)["created"]
                if kind == "completion":
                    expected = CompletionResponse(id="cmpl-0123abc", created=created, model=model, choices=[
                        CompletionChoice(index=index + 3, text=text, token_ids=tokens, finish_reason=reason,
                                         logprobs=logprobs)])  # fmt: skip
                else:
                    expected = ChatCompletionChunk(id="cmpl-0123abc", created=created, model=model, choices=[
                        ChatChunkChoice(index=index + 3, delta=ChatDelta(content=text or None), finish_reason=reason,
                                        logprobs=logprobs)])  # fmt: skip
                assert ours == expected.model_dump_json(), (kind, text, tokens, reason)
                assert abs(created - time.time()) < 5  # each chunk's own time, as the models' default
                checked += 1
    assert checked == 2 * 2 * len(CHUNK_TEXTS) * 3 * 3 * 2


def test_streamed_chunks_parse_and_dump_back_to_the_same_bytes(server):
    """Every chunk of real streams (one choice and several, completion and chat, logprobs and usage) is exactly
    what the response models dump of it: nothing a client parses differs from the pydantic-built chunks."""
    from compiled_llm.server.responses import ChatCompletionChunk, CompletionResponse

    url = server[1]
    chat = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    several = {"prompt": [PROMPTS[1], PROMPTS[0]], "max_tokens": 6, "n": 2, "seed": 3, "temperature": 1.0}
    bodies = [
        ("/v1/completions", CompletionResponse, {"prompt": PROMPTS[2], "max_tokens": 12, "logprobs": 2}),
        ("/v1/completions", CompletionResponse, several),
        ("/v1/chat/completions", ChatCompletionChunk, chat),
    ]
    for path, model, body in bodies:
        body = {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **body}
        with httpx.stream("POST", f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] > 0
        finished = [json.loads(e)["choices"][0]["index"] for e in events[:-2] if json.loads(e)["choices"][0]["finish_reason"]]
        assert sorted(finished) == list(range(body.get("n", 1) * (2 if isinstance(body.get("prompt"), list) else 1)))
        for event in events[:-1]:
            assert model.model_validate_json(event).model_dump_json() == event


def test_an_interrupt_cancels_only_the_wait_for_the_engine():
    """A job of one choice waits in the engine's stream itself: a failure from outside (shutdown deadline,
    --request-timeout) cancels that wait and is raised instead, and the stream is closed (its request aborted);
    a failure while the task is elsewhere is raised at its next wait; a cancel from outside stays a cancel."""
    from compiled_llm.server.errors import APIError
    from compiled_llm.server.jobs import Interrupt as _Interrupt

    closed = []

    async def outputs():
        try:
            yield "first"
            await asyncio.Event().wait()  # the engine, slow
            yield "never"
        finally:
            closed.append(True)

    async def interrupted_while_waiting():
        interrupt, stream = _Interrupt(), outputs()
        assert await interrupt.next(stream) == "first"
        asyncio.get_running_loop().call_later(0.01, interrupt.put_nowait, (-1, APIError(408, "late", "request_timeout")))
        with pytest.raises(APIError, match="late"):
            await interrupt.next(stream)
        assert closed == [True]
        if hasattr(asyncio.current_task(), "cancelling"):  # Python >= 3.11
            assert asyncio.current_task().cancelling() == 0  # the task itself is not being cancelled
        await asyncio.sleep(0)  # and goes on

    async def interrupted_while_busy():
        interrupt, stream = _Interrupt(), outputs()
        interrupt.put_nowait((-1, APIError(503, "shutting down", "server_shutting_down")))
        await asyncio.sleep(0.01)  # not cancelled: it was not waiting
        with pytest.raises(APIError, match="shutting down"):
            await interrupt.next(stream)
        await stream.aclose()

    async def cancelled_from_outside():  # the client left
        async def job():
            interrupt, stream = _Interrupt(), outputs()
            await interrupt.next(stream)
            await interrupt.next(stream)

        task = asyncio.ensure_future(job())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    closed.clear()
    asyncio.run(interrupted_while_waiting())
    asyncio.run(interrupted_while_busy())
    closed.clear()
    asyncio.run(cancelled_from_outside())
    assert closed == [True]
