"""Every way a request can fail gets an OpenAI-shaped JSON error with the right status and code, and the
server goes on serving (issue 21). The app runs in this process (FastAPI's TestClient) over a tiny model."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from compiled_llm import LLM
from compiled_llm.server import build_app

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def llm(text_model_dir):
    return LLM(str(text_model_dir), max_batch_size=4, max_seq_len=96, num_kv_blocks=40, compile_backend="eager")


@pytest.fixture(scope="module")
def http(llm):
    app = build_app(llm, "tiny", api_key=KEY, max_request_bytes=64 << 10)
    with TestClient(app, raise_server_exceptions=False) as client:  # a 500 is a response, as over HTTP
        yield client


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def fail_after_the_first_output(llm, monkeypatch) -> None:
    """The engine's outputs, then a failure: as a step that raises mid-request."""
    generate = llm.generate_async

    async def fails(*args, **kwargs):
        async with contextlib.aclosing(generate(*args, **kwargs)) as outputs:
            async for output in outputs:
                yield output
                raise RuntimeError("the engine failed")

    monkeypatch.setattr(llm, "generate_async", fails)


def test_unknown_routes_and_methods(http):
    assert error(http.get("/v1/nothing", headers=AUTH), 404)["code"] == "not_found"
    assert error(http.get("/v1/completions", headers=AUTH), 405)["code"] == "method_not_allowed"


def test_malformed_json_and_invalid_utf8(http):
    headers = {**AUTH, "Content-Type": "application/json"}
    bad = error(http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=headers), 400)
    assert bad["code"] == "invalid_json" and bad["param"] is None  # not the offset of the error ("1")
    assert "Expecting value" in bad["message"]
    unsent_type = error(http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "a"}', headers=AUTH), 400)
    assert "Content-Type: application/json" in unsent_type["message"]
    raw = b'{"model": "tiny", "prompt": "\xff\xfe"}'
    assert error(http.post("/v1/completions", content=raw, headers=headers), 400)["code"] == "invalid_body"
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_seed_outside_int64_is_a_400_streamed_or_not(http, stream):
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 2, "seed": 2**70, "stream": stream}
    assert error(http.post("/v1/completions", json=body, headers=AUTH), 400)["param"] == "seed"


def test_lone_surrogates_are_a_400(http):
    headers = {**AUTH, "Content-Type": "application/json"}
    raw = b'{"model": "tiny", "prompt": "ab\\ud800cd", "max_tokens": 2}'
    assert error(http.post("/v1/completions", content=raw, headers=headers), 400)["code"] == "invalid_text"
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'
    assert error(http.post("/v1/chat/completions", content=raw, headers=headers), 400)["code"] == "invalid_text"


def test_bodies_over_the_limit_get_413_by_length_or_as_they_arrive(http):
    body = json.dumps({"model": "tiny", "prompt": "a" * (70 << 10)}).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    assert error(http.post("/v1/completions", content=body, headers=headers), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    assert error(http.post("/v1/completions", content=chunks(), headers=headers), 413)["code"] == "request_too_large"


def test_prompts_beyond_the_context_are_context_length_exceeded(http, llm, monkeypatch):
    too_long = {"model": "tiny", "prompt": "ab " * 60, "max_tokens": 8}  # 180 byte tokens > max_seq_len 96
    assert error(http.post("/v1/completions", json=too_long, headers=AUTH), 400)["code"] == "context_length_exceeded"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "ab " * 60}]}
    assert error(http.post("/v1/chat/completions", json=chat, headers=AUTH), 400)["code"] == "context_length_exceeded"
    # Text that cannot fit whatever it tokenizes to is refused without tokenizing it.
    monkeypatch.setattr(llm.tokenizer.__class__, "__call__", lambda *a, **k: pytest.fail("tokenized"))
    huge = {"model": "tiny", "prompt": "x" * (60 << 10), "max_tokens": 2}
    refused = error(http.post("/v1/completions", json=huge, headers=AUTH), 400)
    assert refused["code"] == "context_length_exceeded" and "characters" in refused["message"]


def test_a_failure_mid_stream_ends_with_an_error_event_and_done(http, llm, monkeypatch):
    fail_after_the_first_output(llm, monkeypatch)
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 8, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "internal_error"
    assert "error" not in json.loads(events[0])  # the first output was sent before the failure
    whole = http.post("/v1/completions", json=body, headers=AUTH)
    assert error(whole, 500)["code"] == "internal_error" and whole.headers["connection"] == "close"
    monkeypatch.undo()
    assert http.post("/v1/completions", json=body, headers=AUTH).status_code == 200  # still serving


def test_the_api_key_in_constant_time_and_optionally_on_metrics(llm):
    with TestClient(build_app(llm, "tiny", api_key=KEY, metrics_require_key=True)) as http:
        assert error(http.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert error(http.get("/v1/models", headers={"Authorization": "Bearer k-12"}), 401)["type"] == "authentication_error"
        assert http.get("/v1/models", headers=AUTH).status_code == 200
        assert error(http.get("/metrics"), 401)["code"] == "invalid_api_key"
        assert http.get("/metrics", headers=AUTH).status_code == 200 and http.get("/health").status_code == 200


def test_serve_flags_for_the_key_and_the_body_limit(tmp_path, monkeypatch):
    import argparse

    from compiled_llm.cli import API_KEY_ENV, _api_key, byte_size, positive_seconds

    assert byte_size("16MiB") == 16 << 20 and byte_size("4194304") == 4 << 20 and byte_size("2 KB") == 2000
    for bad in ("0", "-1", "soon"):
        with pytest.raises(argparse.ArgumentTypeError, match="seconds"):
            positive_seconds(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        byte_size("16 parsecs")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert _api_key(argparse.Namespace(api_key=None, api_key_file=None)) == "from-env"
    assert _api_key(argparse.Namespace(api_key=None, api_key_file=str(key_file))) == "from-file"
    with pytest.raises(SystemExit, match="cannot read"):
        _api_key(argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "missing")))


def metric_value(http, line_start: str) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(line_start + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


def test_request_ids_the_log_line_and_what_metrics_count(http, llm, monkeypatch, caplog):
    assert http.get("/health", headers={"X-Request-Id": "ops-42"}).headers["x-request-id"] == "ops-42"
    denied = http.get("/v1/models")  # answered by the key check, before any route: still carries an id
    assert denied.status_code == 401 and len(denied.headers["x-request-id"]) == 32
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 3, "ignore_eos": True}
    with caplog.at_level("INFO", logger="compiled_llm.server"):
        assert http.post("/v1/completions", json=body, headers={**AUTH, "X-Request-Id": "job-7"}).status_code == 200
    assert any(r.getMessage().startswith("job-7: ") and r.getMessage().endswith("finish length") for r in caplog.records)

    errors_before = metric_value(http, 'compiled_llm_errors_total{code="invalid_json"}')
    http.post("/v1/completions", content=b"{", headers={**AUTH, "Content-Type": "application/json"})
    assert metric_value(http, 'compiled_llm_errors_total{code="invalid_json"}') == errors_before + 1
    not_found = metric_value(http, 'compiled_llm_http_responses_total{status="404"}')
    http.get("/v1/none", headers=AUTH)
    assert metric_value(http, 'compiled_llm_http_responses_total{status="404"}') == not_found + 1
    assert "compiled_llm_preemptions_total 0.0" in http.get("/metrics").text

    fail_after_the_first_output(llm, monkeypatch)
    failed_before = metric_value(http, 'compiled_llm_requests_total{finish_reason="error"}')
    aborted_before = metric_value(http, 'compiled_llm_requests_total{finish_reason="abort"}')
    with caplog.at_level("INFO", logger="compiled_llm.server"):
        with http.stream("POST", "/v1/completions", json={**body, "stream": True},
                         headers={**AUTH, "X-Request-Id": "job-8"}) as response:  # fmt: skip
            list(response.iter_lines())
    assert any(r.getMessage().startswith("job-8: ") and r.getMessage().endswith("finish error") for r in caplog.records)
    assert metric_value(http, 'compiled_llm_requests_total{finish_reason="error"}') == failed_before + 1
    assert metric_value(http, 'compiled_llm_requests_total{finish_reason="abort"}') == aborted_before  # not an abort


def test_timeouts_must_be_positive(llm):
    for field in ("request_timeout_s", "read_timeout_s"):
        with pytest.raises(ValueError, match=f"{field}=0: give a number of seconds > 0"):
            build_app(llm, "tiny", **{field: 0})


def test_request_timeout_fails_the_request_in_the_apis_shape(llm):
    with TestClient(build_app(llm, "tiny", request_timeout_s=0.01), raise_server_exceptions=False) as http:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 80, "ignore_eos": True}
        late = error(http.post("/v1/completions", json=body), 408)
        assert late["code"] == "request_timeout" and "--request-timeout" in late["message"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert metric_value(http, 'compiled_llm_requests_total{finish_reason="request_timeout"}') == 2
        deadline = time.time() + 10  # aborted: its blocks are freed after the engine step in progress
        while metric_value(http, "compiled_llm_kv_blocks_used") > 0 and time.time() < deadline:
            time.sleep(0.05)
        assert metric_value(http, "compiled_llm_kv_blocks_used") == 0


def test_an_engine_failure_turns_health_to_503_and_stops_the_server(llm, monkeypatch):
    import asyncio

    import uvicorn

    from compiled_llm.server.http_server import _server_class
    from compiled_llm.server.shutdown import Drain

    monkeypatch.setattr(llm, "engine_failure", None)  # restored after the test: the fixture's LLM is shared
    monkeypatch.setattr(llm, "_step_in_worker", lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: boom")))
    app = build_app(llm, "tiny")
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/health").status_code == 200
        failed = http.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 4})
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
        assert error(http.get("/health"), 503)["code"] == "engine_failed"
    server = _server_class()(uvicorn.Config(app), llm, Drain())
    assert asyncio.run(server.on_tick(0)) is True and server.exit_code == 1


def test_serve_without_the_serve_extra_says_how_to_install_it():
    import subprocess
    import sys

    code = ("import sys; sys.modules['uvicorn'] = None; from compiled_llm.cli import main; "
            "sys.exit(main(['serve', 'random:tiny-llama']))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "pip install 'compiled-llm[serve]'" in done.stderr and "uvicorn" in done.stderr


def test_after_a_500_the_same_client_goes_on(llm, monkeypatch):
    """Over a real socket: a 500 says Connection: close, so a keep-alive client's next request opens a new
    connection instead of failing on the one the server dropped."""
    import socket
    import threading

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(llm, "tiny"), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")
        yield  # an async generator, as generate_async is

    monkeypatch.setattr(llm, "generate_async", broken)
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(8):
                failed = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2})
                assert error(failed, 500)["code"] == "internal_error" and failed.headers["connection"] == "close"
                assert len(failed.headers["x-request-id"]) == 32
                assert client.get("/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_the_length_proof_only_where_the_tokenizer_allows_it(llm):
    """Byte-level BPE without stripping: a bound; a normalizer that strips (or a WordLevel model): none."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compiled_llm.server.prompts import _max_token_chars

    assert _max_token_chars(llm.tokenizer) == 2 * max(len(t) for t in llm.tokenizer.get_vocab())
    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.normalizer = normalizers.Strip()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    assert _max_token_chars(PreTrainedTokenizerFast(tokenizer_object=words)) is None


def test_a_slow_reader_gets_the_whole_text_in_fewer_chunks(http):
    """Outputs a slow client has not read yet are merged into the newest (each holds all so far)."""
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body, headers=AUTH).json()["choices"][0]["text"]
    texts = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                texts.append(json.loads(line[6:])["choices"][0]["text"])
                time.sleep(0.05)  # the engine runs ahead meanwhile
    assert "".join(texts) == whole and 0 < len(texts) < 40  # one chunk per token before
