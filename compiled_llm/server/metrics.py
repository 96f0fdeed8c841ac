"""Prometheus metrics of a server: queue and KV-cache state read from the engine at scrape time, token
counters, generation speed over the last seconds, and latency histograms."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCounters:
    """The engine's own counts, read at scrape time."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        preemptions = CounterMetricFamily("compiled_llm_preemptions", "Requests preempted for KV blocks (recomputed)")
        preemptions.add_metric([], self.stats().preemptions)
        yield preemptions


def _hit_rate(stats) -> float:
    return stats.prefix_hit_tokens / stats.prefix_queried_tokens if stats.prefix_queried_tokens else 0.0


class ServerMetrics:
    def __init__(self, llm, window_s: float = 10.0, waiting=None):
        """`llm`: an LLM or an engine_core.EngineCoreClient (their `stats()` and `num_waiting`); `waiting`: how
        many requests wait (default: the engine's queue; the server adds those accepted and not yet queued)."""
        self.registry = CollectorRegistry()
        stats = llm.stats

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, registry=self.registry).set_function(read)

        gauge("compiled_llm_requests_running", "Requests being computed", lambda: stats().running)
        gauge("compiled_llm_requests_waiting", "Requests queued, not running yet", waiting or (lambda: llm.num_waiting))
        gauge("compiled_llm_kv_blocks_total", "KV-cache blocks", lambda: stats().kv_blocks_total)
        gauge("compiled_llm_kv_blocks_used", "KV-cache blocks held by requests", lambda: stats().kv_blocks_used)
        gauge("compiled_llm_prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the prefix cache",
              lambda: _hit_rate(stats()))  # fmt: skip
        gauge("compiled_llm_generation_tokens_per_second", f"Output tokens per second over the last {window_s:g} s",
              self._tokens_per_second)  # fmt: skip
        self.prompt_tokens = Counter("compiled_llm_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.generation_tokens = Counter("compiled_llm_generation_tokens", "Output tokens", registry=self.registry)
        self.requests = Counter("compiled_llm_requests", "Finished requests", ["finish_reason"], registry=self.registry)
        self.responses = Counter("compiled_llm_http_responses", "HTTP responses by status", ["status"],
                                 registry=self.registry)  # fmt: skip
        self.errors = Counter("compiled_llm_errors", "Error responses and failed streams by code", ["code"],
                              registry=self.registry)  # fmt: skip
        self.registry.register(_EngineCounters(stats))
        self.ttft = Histogram("compiled_llm_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.itl = Histogram("compiled_llm_inter_token_latency_seconds", "Mean time between output tokens, per request",
                             buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.e2e = Histogram("compiled_llm_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, output tokens) of recent updates

    def _tokens_per_second(self) -> float:
        cutoff = time.monotonic() - self._window_s
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self._window_s

    def tokens(self, count: int) -> None:
        if count > 0:
            self.generation_tokens.inc(count)
            self._recent.append((time.monotonic(), count))

    def finished(self, output, count_prompt: bool = True) -> None:
        """A finished RequestOutput (`count_prompt`: False for the further completions of one prompt)."""
        if count_prompt:
            self.prompt_tokens.inc(len(output.prompt_token_ids))
        m = output.metrics
        for completion in output.outputs:
            self.requests.labels(completion.finish_reason or "abort").inc()
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            tokens = max(len(c.token_ids) for c in output.outputs)
            if m.finish_time is not None:
                self.e2e.observe(m.finish_time - m.arrival_time)
                if tokens > 1:
                    self.itl.observe((m.finish_time - m.first_token_time) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
