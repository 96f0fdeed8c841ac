"""The server's processes (issue 21): `compiled-llm serve` is an API process and an engine-core process. Signals
reach the API process, which drains and stops the core; a core that dies fails what runs and stops the server
with a non-zero status; a server killed outright takes its core with it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.test_server import KEY, PROMPTS, engine_core, metric, start_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

AUTH = {"Authorization": f"Bearer {KEY}"}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stream_events(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:  # fmt: skip
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_sigterm_finishes_running_requests_and_exits_0(text_model_dir, tmp_path):
    process, url, log = start_server(text_model_dir, tmp_path)
    body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 60, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    assert first and rest[-1] == "data: [DONE]"  # the request in flight ran to its end
    assert process.wait(timeout=60) == 0
    log.seek(0)
    text = log.read()
    assert "prompt tokens" in text and "60 output tokens" in text  # one line per request
    assert len(re.findall(r"compiled-llm: \w+ on cpu", text)) == 1  # the compile report, logged once
    assert "engine core ready" in text and "Traceback" not in text
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)


def test_past_the_shutdown_timeout_requests_fail_in_the_apis_shape(text_model_dir, tmp_path):
    """24 long requests over 16 batch slots, SIGTERM, 0.3 s to finish: the unfinished get 503 or an error event
    then [DONE]; none is cut; the server exits 0 (it was asked to stop)."""
    process, url, _ = start_server(text_model_dir, tmp_path, "--shutdown-timeout", "0.3")
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 150, "ignore_eos": True}
    with ThreadPoolExecutor(24) as pool:
        streams = [pool.submit(stream_events, url, body) for _ in range(12)]
        whole = [pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60,
                             headers={"Authorization": f"Bearer {KEY}"}) for _ in range(12)]  # fmt: skip
        deadline = time.time() + 30
        while metric(url, "compiled_llm_requests_running") < 16 and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        streams, whole = [f.result() for f in streams], [f.result() for f in whole]
    assert process.wait(timeout=60) == 0
    assert all(events[-1] == "[DONE]" for events in streams)
    failed = [json.loads(e[-2])["error"] for e in streams if "error" in json.loads(e[-2])]
    refused = [r.json()["error"] for r in whole if r.status_code == 503]
    assert failed or refused  # 24 x 150 tokens cannot all finish in 0.3 s
    assert all(e["code"] == "server_shutting_down" for e in failed + refused)
    assert all(r.status_code in (200, 503) for r in whole)


def test_a_second_signal_forces_the_exit_with_status_1(text_model_dir, tmp_path):
    """The engine core is paused (SIGSTOP) once the stream has started, so the stream cannot end before the second
    signal (150 tokens of the tiny model took about as long as the test's pause: in CI it once ended first)."""
    process, url, _ = start_server(text_model_dir, tmp_path, "--shutdown-timeout", "60")
    core = engine_core(process.pid)
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response, and the server has no one to wait for
        while not next(lines).startswith("data:"):
            pass
        os.kill(core, signal.SIGSTOP)
        try:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert process.poll() is None  # waiting for the stream
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(core, signal.SIGCONT)  # it then finds its parent gone and exits


def test_the_engine_runs_in_a_process_of_its_own(text_model_dir, tmp_path):
    """Killed outright, the server leaves no engine behind."""
    process, url, _ = start_server(text_model_dir, tmp_path)
    core = engine_core(process.pid)
    assert httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4}).status_code == 200  # fmt: skip
    process.kill()
    process.wait()
    deadline = time.time() + 10
    while alive(core):
        assert time.time() < deadline, "the engine core outlived its server"
        time.sleep(0.1)


def test_ctrl_c_drains_the_server_and_the_engine_ignores_it(text_model_dir, tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the engine core ignores it, the API process lets the
    running stream finish, then stops the core, and exits 0."""
    process, url, log = start_server(text_model_dir, tmp_path, new_session=True)
    body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 60, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.killpg(process.pid, signal.SIGINT)
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2].replace(" ", "")
    assert process.wait(timeout=60) == 0
    log.seek(0)
    assert "Traceback" not in log.read()


def test_an_engine_core_that_dies_fails_the_stream_and_stops_the_server(text_model_dir, tmp_path):
    process, url, _ = start_server(text_model_dir, tmp_path)
    core = engine_core(process.pid)
    body = {"model": "tiny", "prompt": PROMPTS[4], "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.kill(core, signal.SIGKILL)
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data:")]
    assert rest[-1] == "[DONE]" and "engine core process exited" in json.loads(rest[-2])["error"]["message"]
    assert process.wait(timeout=60) == 1


def test_a_server_over_two_ranks_answers_as_one_and_stops_them(text_model_dir, tmp_path):
    """serve --tensor-parallel-size 2: the engine core is rank 0 and starts rank 1 (rank_workers.py), whose engine
    steps as the core's does; concurrent requests get the tokens one rank gives, and SIGTERM stops every process."""
    from compiled_llm import LLM, SamplingParams

    one_rank = LLM(str(text_model_dir), compile_backend="eager", max_batch_size=4, max_seq_len=160)
    expected = [out.outputs[0].text for out in one_rank.generate(
        PROMPTS[:3], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)]  # fmt: skip
    process, url, _ = start_server(text_model_dir, tmp_path, "--tensor-parallel-size", "2")
    core = engine_core(process.pid)
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == core]
    body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda prompt: httpx.post(f"{url}/v1/completions", json={**body, "prompt": prompt},
                                                           headers=AUTH, timeout=60).json(), PROMPTS[:3]))  # fmt: skip
    assert [answer["choices"][0]["text"] for answer in answers] == expected
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in [core, *workers]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers and not any(alive(pid) for pid in [core, *workers])


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
