"""A decode step at a large batch, split into GPU time and host time (BENCHMARKS.md, issue 19).

    python benchmarks/decode_step_split.py random:llama-3.1-8b --batch-sizes 512 1024 --profile-dir out/

For each batch size B: an LLM with max_batch_size=B, B requests of --input-len random tokens prefilled, then
--steps decode steps of all B, each timed:
- step: wall time of `engine.step()` (what every request waits per token; the engine launches step n+1
  before reading step n's tokens, so a step takes the longer of its GPU and host parts);
- host: that wall time less the time spent blocked on the GPU (CUDA event waits, and graph launches
  waiting for room in the GPU's queue): scheduling, step inputs, attention planning, launches, reading
  tokens, request bookkeeping;
- GPU: the step's CUDA graph replayed back to back, timed with CUDA events (the model's kernels alone).
With --profile-dir, a cProfile of the host over as many steps again is written there per batch size.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import statistics
import time
from pathlib import Path

import torch

from compiled_llm import LLM, SamplingParams
from compiled_llm.bench.throughput import load_prompts


class BlockedTime:
    """Seconds the host spends waiting for the GPU: in CUDA event waits (`event_s`), and in CUDA-graph
    launches (`launch_s`: a launch blocks while the GPU's queue is full, as it is when the host runs a
    step ahead; the caller adds back what a launch costs on an idle GPU)."""

    def __init__(self):
        self.event_s = self.launch_s = 0.0
        self._inner = (torch.cuda.Event.synchronize, torch.cuda.CUDAGraph.replay)

    def __enter__(self):
        synchronize, replay = self._inner

        def timed_synchronize(event):
            start = time.perf_counter()
            synchronize(event)
            self.event_s += time.perf_counter() - start

        def timed_replay(graph):
            start = time.perf_counter()
            replay(graph)
            self.launch_s += time.perf_counter() - start

        torch.cuda.Event.synchronize, torch.cuda.CUDAGraph.replay = timed_synchronize, timed_replay
        return self

    def __exit__(self, *exc):
        torch.cuda.Event.synchronize, torch.cuda.CUDAGraph.replay = self._inner


def graph_launch_ms(graphs, batch_size: int, repeats: int = 10) -> float:
    """Host time of one replay call on an idle GPU."""
    graph, _ = graphs._graphs[batch_size]
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e3 * statistics.median(times)


def graph_replay_ms(graphs, batch_size: int, repeats: int = 20) -> float:
    graph, _ = graphs._graphs[batch_size]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def timed_steps(engine, count: int) -> tuple[list[float], list[float], list[float]]:
    """Per step of `count` engine steps: wall seconds, seconds in event waits, seconds in graph launches."""
    walls, events, launches = [], [], []
    with BlockedTime() as blocked:
        for _ in range(count):
            event_s, launch_s = blocked.event_s, blocked.launch_s
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
            events.append(blocked.event_s - event_s)
            launches.append(blocked.launch_s - launch_s)
    return walls, events, launches


def split(model, batch: int, args) -> dict:
    steps = args.warmup_steps + 2 * args.steps
    llm = LLM(model, max_batch_size=batch, max_num_tokens=max(8192, batch), attention_backend=args.attention_backend,
              max_seq_len=args.input_len + steps + 16)  # fmt: skip
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    requests = [engine.add_request(p, params) for p in load_prompts(batch, args.input_len, llm.compiled.vocab_size)]
    while any(r.seq.num_computed < args.input_len for r in requests):
        engine.step()  # prefill
    for _ in range(args.warmup_steps):
        engine.step()
    walls, events, launches = timed_steps(engine, args.steps)
    if args.profile_dir:  # more steps of the same kind, under cProfile
        profiler = cProfile.Profile()
        profiler.runcall(timed_steps, engine, args.steps)
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(args.profile_dir / f"host_batch{batch}.prof"))
    torch.cuda.synchronize()
    gpu = graph_replay_ms(engine.runner.cuda_graphs, batch)  # max_batch_size is a captured size
    launch = graph_launch_ms(engine.runner.cuda_graphs, batch)
    ms = lambda values: 1e3 * statistics.median(values)  # noqa: E731
    result = {
        "batch": batch, "step_ms": ms(walls), "gpu_ms": gpu,
        "host_ms": ms([w - e - l for w, e, l in zip(walls, events, launches)]) + launch,
        "host_with_launch_wait_ms": ms([w - e for w, e in zip(walls, events)]),
    }  # fmt: skip
    del llm, engine, requests
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--profile-dir", type=Path, help="write a cProfile of the host per batch size here")
    args = parser.parse_args()
    from compiled_llm.model_source import load_model

    model = load_model(args.model).model
    print(f"{args.model} on {torch.cuda.get_device_name()}, input {args.input_len}, median of {args.steps} decode steps")
    print(f"{'batch':>6}{'step ms':>10}{'GPU ms':>10}{'host ms':>10}{'host/GPU':>10}{'host + launch wait ms':>24}")
    for batch in args.batch_sizes:
        r = split(model, batch, args)
        print(f"{r['batch']:>6}{r['step_ms']:>10.2f}{r['gpu_ms']:>10.2f}{r['host_ms']:>10.2f}"
              f"{r['host_ms'] / r['gpu_ms']:>10.2f}{r['host_with_launch_wait_ms']:>24.2f}", flush=True)

if __name__ == "__main__":
    main()
