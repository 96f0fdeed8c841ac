"""`compiled-llm bench --mode serving` against a fake OpenAI-compatible server in a background thread: the client's
concurrency, streaming timings, token counts, errors, plot and table, on the CPU in about a second."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from compiled_llm.bench.serving import format_serving_table, run_serving_benchmark
from compiled_llm.bench.throughput import load_prompts

MODEL = "fake/model-1"
FIRST_TOKEN_S = 0.02  # the fake's "prefill": TTFT can't be shorter
TOKEN_S = 0.01  # the fake's sleep between chunks: what ITL should measure
FAIL_TOKEN = 999  # prompts starting with this token get a 500


class _State:
    """What the fake server is told (api key, usage chunk, tokens per chunk) and what it saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.api_key = None
        self.usage = True
        self.tokens_per_chunk = 1
        self.bodies = []
        self.in_flight = 0
        self.max_in_flight = 0


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streaming, as uvicorn serves it

        def log_message(self, *args):
            pass  # keep the test output clean

        def _json(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def _event(self, payload: dict) -> None:
            self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

        def _authorized(self) -> bool:
            if state.api_key is None or self.headers.get("Authorization") == f"Bearer {state.api_key}":
                return True
            self._json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}})  # fmt: skip
            return False

        def do_GET(self):
            if self.path != "/v1/models":
                self._json(404, {"error": {"message": f"no route {self.path}"}})
            elif self._authorized():
                self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"},
                                                            {"id": "fake/other", "object": "model"}]})  # fmt: skip

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            if not self._authorized():
                return
            with state.lock:
                state.bodies.append(body)
            if body["prompt"][0] == FAIL_TOKEN:
                return self._json(500, {"error": {"message": "the fake is overloaded"}})
            with state.lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            time.sleep(FIRST_TOKEN_S)
            for first in range(0, body["max_tokens"], state.tokens_per_chunk):
                if first:
                    time.sleep(TOKEN_S)
                text = "x" * min(state.tokens_per_chunk, body["max_tokens"] - first)
                self._event({"object": "text_completion", "model": MODEL,
                             "choices": [{"index": 0, "text": text, "finish_reason": None}]})  # fmt: skip
            if state.usage:
                tokens = body["max_tokens"]
                self._event({"object": "text_completion", "model": MODEL, "choices": [],
                             "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": tokens,
                                       "total_tokens": len(body["prompt"]) + tokens}})  # fmt: skip
            with state.lock:  # before [DONE]: once the client reads it, it may send its next request
                state.in_flight -= 1
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

    return Handler


@pytest.fixture
def server():
    state = _State()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_port}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _ordered(percentiles: dict) -> bool:
    return 0 < percentiles["p50"] <= percentiles["p90"] <= percentiles["p99"]


def test_streams_every_request_with_bounded_concurrency(server):
    result = run_serving_benchmark(server.url + "/v1/", None, num_requests=12, input_len=16, output_len=5,
                                   concurrency=4)  # fmt: skip
    assert result["url"] == server.url and result["model"] == MODEL  # /v1/ stripped, first listed model taken
    assert result["completed"] == 12 and result["failed"] == 0 and result["errors"] == []
    assert result["output_tokens"] == 60 and result["prompt_tokens"] == 12 * 16
    assert server.max_in_flight == 4  # the limit is reached and never passed
    assert _ordered(result["ttft_s"]) and _ordered(result["itl_s"]) and _ordered(result["e2e_s"])
    assert result["ttft_s"]["p50"] >= FIRST_TOKEN_S
    assert TOKEN_S / 3 < result["itl_s"]["p50"] < TOKEN_S * 3
    assert result["e2e_s"]["p50"] >= FIRST_TOKEN_S + 4 * TOKEN_S
    assert result["output_tokens_per_s"] == pytest.approx(60 / result["elapsed_s"])
    assert result["total_tokens_per_s"] == pytest.approx((60 + 12 * 16) / result["elapsed_s"])
    assert len(server.bodies) == 12
    for body in server.bodies:
        assert body["model"] == MODEL and body["stream"] is True and body["ignore_eos"] is True
        assert body["max_tokens"] == 5 and body["temperature"] == 0
        assert body["stream_options"] == {"include_usage": True}
    # The seeded random prompts, each sent once (in whatever order the workers took them).
    assert sorted(body["prompt"] for body in server.bodies) == sorted(load_prompts(12, 16, 1000, seed=4))


def test_usage_chunk_counts_tokens_and_text_chunks_count_without_it(server):
    server.tokens_per_chunk = 2  # a server may stream several tokens per chunk: only usage knows how many
    result = run_serving_benchmark(server.url, MODEL, num_requests=2, input_len=4, output_len=4, concurrency=2)
    assert result["output_tokens"] == 2 * 4
    server.usage = False
    result = run_serving_benchmark(server.url, MODEL, num_requests=2, input_len=4, output_len=4, concurrency=2)
    assert result["output_tokens"] == 2 * 2


def test_failed_requests_are_counted_and_the_rest_measured(server):
    prompts = [[FAIL_TOKEN if i % 3 == 0 else 5, 6, 7] for i in range(6)]
    result = run_serving_benchmark(server.url, MODEL, num_requests=6, input_len=3, output_len=2, concurrency=3,
                                   prompts=prompts)  # fmt: skip
    assert result["completed"] == 4 and result["failed"] == 2 and result["output_tokens"] == 4 * 2
    assert result["errors"] == ["HTTP 500: the fake is overloaded"] * 2
    assert result["input_len"] is None  # the given prompts set the lengths
    table = format_serving_table(result)
    assert "HTTP 500: the fake is overloaded" in table


def test_wrong_api_key_is_one_clear_error(server):
    server.api_key = "right"
    with pytest.raises(ValueError, match="all 3 requests .* failed: HTTP 401: Incorrect API key provided"):
        run_serving_benchmark(server.url, MODEL, num_requests=3, input_len=4, output_len=2, concurrency=2,
                              api_key="wrong")  # fmt: skip
    assert server.bodies == []  # refused before any work
    with pytest.raises(ValueError, match="/v1/models failed: HTTP 401: Incorrect API key provided"):
        run_serving_benchmark(server.url, None, num_requests=1, input_len=4, output_len=2, concurrency=1)
    result = run_serving_benchmark(server.url, None, num_requests=1, input_len=4, output_len=2, concurrency=1,
                                   api_key="right")  # fmt: skip
    assert result["completed"] == 1


def test_unreachable_server_is_one_clear_error():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match="all 2 requests .* failed: ConnectionRefusedError"):
        run_serving_benchmark(f"http://127.0.0.1:{port}", MODEL, num_requests=2, input_len=4, output_len=2,
                              concurrency=2)  # fmt: skip
    with pytest.raises(ValueError, match="--url must look like"):
        run_serving_benchmark("127.0.0.1:8000", MODEL, num_requests=1, input_len=4, output_len=2, concurrency=1)


def test_plot_writes_a_png(server, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "serving.png"
    run_serving_benchmark(server.url, None, num_requests=4, input_len=4, output_len=3, concurrency=2, plot=str(path))
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 10_000


def test_table_shows_the_figures(server):
    result = run_serving_benchmark(server.url, None, num_requests=4, input_len=8, output_len=3, concurrency=2)
    table = format_serving_table(result)
    assert f"{result['output_tokens_per_s']:.1f}" in table and f"{result['total_tokens_per_s']:.1f}" in table
    assert f"{MODEL} at {server.url}: 4 requests, concurrency 2, input 8, output 3" in table
    ttft = "/".join(f"{1e3 * result['ttft_s'][p]:.1f}" for p in ("p50", "p90", "p99"))
    assert ttft in table
