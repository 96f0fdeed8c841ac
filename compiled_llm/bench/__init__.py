"""Benchmarks behind `compiled-llm bench`: each measures this project and its baselines in one process."""

from compiled_llm.bench.latency import run_latency_benchmark

__all__ = ["run_latency_benchmark"]
