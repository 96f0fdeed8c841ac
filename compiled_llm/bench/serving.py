"""`compiled-llm bench --mode serving`: the client side of a serving benchmark, against any running
OpenAI-compatible server (ours, vLLM, ...) given by its URL.

`num_requests` streamed completions with at most `concurrency` in flight: each worker sends its next request as
soon as its previous one ends (a closed loop, like users waiting on their answers). Prompts are token ids and every
request asks for exactly `output_len` tokens (`ignore_eos`), so different servers do the same work. Times are taken
here, on the client, so they include the network and the server's HTTP layer: what a user of the server sees.
Reported: output tokens/s, total (prompt + output) tokens/s, requests/s, and percentiles of time to first token
(from sending), of inter-token latency (gaps between streamed chunks with text) and of end-to-end latency.
Only the standard library speaks HTTP, so the benchmark needs no client package on the machine it runs from.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from compiled_llm.bench.throughput import PERCENTILES, _percentiles, load_prompts

MAX_ERRORS = 5  # error messages kept in the result: enough to see what went wrong, not a log of every failure


def _base_url(url: str) -> str:
    """The server's root: users paste either `http://host:port` or the OpenAI-style `http://host:port/v1`."""
    base = url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--url must look like http://host:port, got {url!r}")
    return base


def _connect(base: str, timeout_s: float) -> tuple[http.client.HTTPConnection, str]:
    """A new connection and the URL's path prefix (a server may sit behind a proxy at `http://host/some/path`)."""
    parts = urlsplit(base)
    connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return connection(parts.netloc, timeout=timeout_s), parts.path


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _message(payload) -> str | None:
    """The error text of a JSON error body: OpenAI's `{"error": {"message": ...}}`, older vLLM's top-level
    `message`, or FastAPI's `detail`."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error", payload)
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail")
        return str(message) if message else None
    return str(error) if error else None


def _error_message(status: int, body: bytes) -> str:
    text = body.decode(errors="replace").strip()
    try:
        message = _message(json.loads(text))
    except ValueError:
        message = None
    return f"HTTP {status}: {message or text[:200] or '(empty body)'}"


def _first_model(base: str, api_key: str | None, timeout_s: float) -> str:
    """The first model `GET /v1/models` lists: a server started with one model needs no `--model`."""
    connection, prefix = _connect(base, timeout_s)
    try:
        connection.request("GET", prefix + "/v1/models", headers=_headers(api_key))
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise ValueError(f"cannot reach {base}: {error}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise ValueError(f"GET {base}/v1/models failed: {_error_message(response.status, body)}")
    try:
        models = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"GET {base}/v1/models did not answer an OpenAI model list: pass --model") from None
    if not models:
        raise ValueError(f"{base}/v1/models lists no model: pass --model")
    return models[0]["id"]


def _read_stream(response, token_times: list[float]) -> tuple[int | None, str | None]:
    """Reads server-sent events up to `data: [DONE]`, appending the arrival time of each chunk with tokens.
    Returns (completion_tokens from the usage chunk, or None if there was none; an error message or None)."""
    completion_tokens = None
    for raw in response:
        now = time.perf_counter()  # before parsing: the chunk arrived now
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue  # blank event separators, `: keep-alive` comments, `event:` lines
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return completion_tokens, None
        chunk = json.loads(data)
        if "error" in chunk:  # a failure after the 200 header was sent can only be reported in the stream
            return None, f"error in stream: {_message(chunk)}"
        choices = chunk.get("choices") or []
        # `token_ids` (an extension of our server and vLLM's) marks tokens that decode to no text yet, and
        # every token of a model served without a tokenizer.
        if choices and (choices[0].get("text") or choices[0].get("token_ids")):
            token_times.append(now)
        if chunk.get("usage"):
            completion_tokens = chunk["usage"].get("completion_tokens")
    return None, "the stream ended before data: [DONE]"


def _drain(response) -> None:
    """Reads the body's end (after [DONE]) before the connection closes: closing on unread bytes resets it, which a
    server may log as an error. Untimed and unchecked: the answer was complete at [DONE]."""
    try:
        response.read()
    except (OSError, http.client.HTTPException):
        pass


def _send_request(base: str, model: str, prompt: list[int], output_len: int, api_key: str | None,
                  timeout_s: float) -> dict:  # fmt: skip
    """One streamed completion. A failure is recorded, not raised, so that one bad request doesn't stop the rest."""
    body = json.dumps({
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # a vLLM extension: every request then makes exactly output_len tokens
    }).encode()  # fmt: skip
    record = {"prompt_tokens": len(prompt), "token_times": [], "output_tokens": 0, "error": None}
    # A connection per request: what a new user does, and no keep-alive state that servers handle differently.
    connection, prefix = _connect(base, timeout_s)
    record["start"] = time.perf_counter()
    try:
        connection.request("POST", prefix + "/v1/completions", body=body, headers=_headers(api_key))
        response = connection.getresponse()
        if response.status != 200:
            record["error"] = _error_message(response.status, response.read())
        else:
            completion_tokens, record["error"] = _read_stream(response, record["token_times"])
            record["output_tokens"] = len(record["token_times"]) if completion_tokens is None else completion_tokens
            record["end"] = time.perf_counter()
            _drain(response)
    except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out (TimeoutError is an OSError)
        record["error"] = f"{type(error).__name__}: {error}"
    except ValueError as error:  # a chunk that is not JSON, or not UTF-8
        record["error"] = f"bad stream chunk: {error}"
    finally:
        record.setdefault("end", time.perf_counter())
        connection.close()
    return record


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _figure_class():
    """matplotlib's Figure, used without pyplot: no GUI backend and no global state, so it works headless and
    leaves the caller's backend alone (saving a PNG renders with Agg)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    return Figure


def _plot(path: str, result: dict, ttft: list[float], itl: list[float], e2e: list[float]) -> None:
    """Cumulative distributions of TTFT, ITL and E2E latency, with their percentiles marked: tails show in a CDF
    where a histogram hides them in a few short bars."""
    figure = _figure_class()(figsize=(15, 4.5), layout="constrained")
    panels = (
        ("time to first token (ms)", ttft, result["ttft_s"], 1e3),
        ("inter-token latency (ms)", itl, result["itl_s"], 1e3),
        ("end-to-end latency (s)", e2e, result["e2e_s"], 1.0),
    )
    for axes, (label, values, percentiles, scale) in zip(figure.subplots(1, 3), panels):
        axes.set_xlabel(label)
        axes.set_ylabel("fraction of samples")
        axes.grid(alpha=0.3)
        if not values:  # no ITL when each request makes a single token
            axes.text(0.5, 0.5, "no samples", ha="center", va="center", transform=axes.transAxes)
            continue
        values = sorted(scale * v for v in values)
        axes.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
        axes.locator_params(axis="x", nbins=5)  # long tick labels would run into each other
        for p, style in zip(PERCENTILES, (":", "--", "-.")):
            value = scale * percentiles[f"p{p}"]
            axes.axvline(value, color="gray", linestyle=style, label=f"p{p} {value:.3g}")
        axes.legend(loc="lower right")
    figure.suptitle(
        f"{result['model']} at {result['url']}: concurrency {result['concurrency']}, {result['completed']} requests, "
        f"{result['output_tokens_per_s']:.1f} output tok/s, {result['requests_per_s']:.2f} req/s"
    )
    figure.savefig(path, dpi=100)


def run_serving_benchmark(
    url: str,
    model: str | None,
    num_requests: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    api_key: str | None = None,
    prompts: list[list[int]] | None = None,
    plot: str | None = None,
    timeout_s: float = 600.0,
    vocab_size: int = 1000,
) -> dict:
    """Drives the server at `url` and measures it. `prompts` (token ids) replace the random ones, of `input_len`
    tokens drawn in [3, vocab_size): the default 1000 is below any real model's vocabulary. `timeout_s` bounds each
    socket operation (connect, each read), so a stalled server fails its requests instead of hanging the run."""
    if min(num_requests, input_len, output_len, concurrency) < 1:
        raise ValueError("num_requests, input_len, output_len and concurrency must be >= 1")
    if plot is not None:
        _figure_class()  # fail now, not after a long run
    base = _base_url(url)
    model = model or _first_model(base, api_key, timeout_s)
    given_prompts = prompts is not None
    if not given_prompts:
        # Seeded by the concurrency: runs at several levels against one server never find each other's
        # prompts in its prefix cache.
        prompts = load_prompts(num_requests, input_len, vocab_size, seed=concurrency)
    elif len(prompts) < num_requests:
        raise ValueError(f"{len(prompts)} prompts, fewer than --num-requests {num_requests}")
    prompts = prompts[:num_requests]

    pool = ThreadPoolExecutor(max_workers=concurrency)  # the pool's size is what bounds the requests in flight
    start = time.perf_counter()
    try:
        records = list(pool.map(lambda p: _send_request(base, model, p, output_len, api_key, timeout_s), prompts))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, drop the queued requests instead of sending them all first
    elapsed = time.perf_counter() - start

    done = [r for r in records if r["error"] is None]
    errors = [r["error"] for r in records if r["error"] is not None]
    if not done:
        raise ValueError(f"all {num_requests} requests to {base} failed: {errors[0]}")
    # A request whose chunks all had empty text (tokens that decode to nothing yet) has no first-token time.
    ttft = [r["token_times"][0] - r["start"] for r in done if r["token_times"]]
    itl = [later - earlier for r in done for earlier, later in zip(r["token_times"], r["token_times"][1:])]
    e2e = [r["end"] - r["start"] for r in done]
    output_tokens = sum(r["output_tokens"] for r in done)
    prompt_tokens = sum(r["prompt_tokens"] for r in done)  # failed requests did no work worth counting
    result = {
        "mode": "serving",
        "url": base,
        "model": model,
        "num_requests": num_requests,
        "concurrency": concurrency,
        "input_len": None if given_prompts else input_len,  # given prompts have their own lengths
        "output_len": output_len,
        "completed": len(done),
        "failed": len(errors),
        "errors": errors[:MAX_ERRORS],
        "elapsed_s": elapsed,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "requests_per_s": len(done) / elapsed,
        "ttft_s": _percentiles(ttft),
        "itl_s": _percentiles(itl),
        "e2e_s": _percentiles(e2e),
        "mean_ttft_s": _mean(ttft),
        "mean_itl_s": _mean(itl),
        "mean_e2e_s": _mean(e2e),
    }
    if plot is not None:
        _plot(plot, result, ttft, itl, e2e)
    return result


def format_serving_table(result: dict) -> str:
    def cuts(key: str, scale: float, digits: int) -> str:
        return "/".join(f"{scale * result[key][f'p{p}']:.{digits}f}" for p in PERCENTILES)

    lines = [
        f"{result['model']} at {result['url']}: {result['num_requests']} requests, concurrency "
        f"{result['concurrency']}, input {result['input_len'] or 'given prompts'}, output {result['output_len']}",
        f"{'output tok/s':>12}{'total tok/s':>13}{'req/s':>9}{'TTFT p50/p90/p99 ms':>24}"
        f"{'ITL p50/p90/p99 ms':>22}{'E2E p50/p90/p99 s':>22}{'failed':>8}",
        f"{result['output_tokens_per_s']:>12.1f}{result['total_tokens_per_s']:>13.1f}{result['requests_per_s']:>9.2f}"
        f"{cuts('ttft_s', 1e3, 1):>24}{cuts('itl_s', 1e3, 1):>22}{cuts('e2e_s', 1.0, 2):>22}{result['failed']:>8}",
    ]
    lines += [f"error: {message}" for message in result["errors"]]
    return "\n".join(lines)
