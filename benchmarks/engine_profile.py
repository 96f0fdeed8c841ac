"""Where an engine step's time goes: host time per phase (schedule, build inputs + launch, wait for the
GPU, sample, bookkeeping) and the steps by kind, over a throughput run.

    python benchmarks/engine_profile.py random:llama-3.1-8b --num-requests 512 --max-batch-size 256
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from compiled_llm import LLM, SamplingParams
from compiled_llm.bench.throughput import load_prompts


def instrument(engine, totals: collections.Counter, counts: collections.Counter) -> None:
    """Wrap the engine's parts so that each call adds its host seconds to `totals[name]`."""

    def wrap(owner, attr: str, name: str, sync: bool = False):
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            if sync:
                torch.cuda.synchronize()
            totals[name] += time.perf_counter() - start
            counts[name] += 1
            return out

        setattr(owner, attr, timed)

    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine.runner, "execute", "execute (inputs + launch)")
    wrap(engine, "_process", "read previous tokens (incl. wait)")
    wrap(engine, "step", "step total")


def staggered(llm, prompts, params, trace_step: int | None = None) -> None:
    """Requests that arrive one per engine step: steps of every mix of prefill and decode, and of every
    batch size. Steps over 3x the median are listed with their composition (a lazy compile shows here)."""
    engine, times = llm.engine, []
    pending = [p[2:] + p[:2] for p in prompts[: 2 * llm.compiled.config.max_batch_size]]
    while pending or engine.has_work:
        if pending:
            engine.add_request(pending.pop(), params)
        schedule = engine.scheduler.schedule
        seen = []

        def recording():
            out = schedule()
            seen.append([(chunk.num_tokens, chunk.logits) for _, chunk in out])
            return out

        engine.scheduler.schedule = recording
        start = time.perf_counter()
        if trace_step is not None and len(times) == trace_step:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=70))
        else:
            engine.step()
        times.append((time.perf_counter() - start, seen[0] if seen else []))
        engine.scheduler.schedule = schedule
    median = sorted(t for t, _ in times)[len(times) // 2]
    print(f"staggered: {len(times)} steps, median {1e3 * median:.1f} ms")
    for i, (t, chunks) in enumerate(times):
        if t > 3 * median:
            tokens = sum(n for n, _ in chunks)
            print(f"  step {i}: {1e3 * t:.0f} ms, {len(chunks)} sequences, {tokens} tokens, "
                  f"{sum(n > 1 for n, _ in chunks)} prefill chunks")


def traced_window(step, first: int, count: int):
    """`step`, with steps first..first+count-1 run under torch.profiler; prints the window's kernels by GPU time
    and how much of its wall time they cover (below 100%: the GPU waited for the host)."""
    from torch.profiler import ProfilerActivity, profile

    state = {"n": 0, "prof": None, "start": 0.0}

    def traced():
        n = state["n"]
        if n == first:
            torch.cuda.synchronize()
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["prof"].__enter__()
            state["start"] = time.perf_counter()
        out = step()
        if n == first + count - 1:
            torch.cuda.synchronize()
            wall = time.perf_counter() - state["start"]
            prof = state["prof"]
            prof.__exit__(None, None, None)
            events = prof.key_averages()
            # Without the runner's own ranges (compiled_llm.replay spans the graph's kernels on the GPU's timeline).
            kernel_us = sum(e.self_device_time_total for e in events if not e.key.startswith("compiled_llm."))
            print(f"trace window: steps {first}..{n}, {1e3 * wall:.1f} ms wall, {kernel_us / 1e3:.1f} ms of kernels "
                  f"({kernel_us / 1e6 / wall:.1%} of the wall time)")
            print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70))
        state["n"] += 1
        return out

    return traced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--quantization", default="none", help="CompileConfig.quantization (none, fp8)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="CompileConfig.kv_cache_dtype (auto, fp8)")
    parser.add_argument("--trace", action="store_true", help="also profile a short run with torch.profiler")
    parser.add_argument("--trace-step", type=int, help="staggered: profile this step with torch.profiler")
    parser.add_argument("--trace-window", metavar="FIRST:COUNT",
                        help="profile COUNT steps of the measured run from step FIRST (steady state): kernels by GPU "
                             "time, and the share of the window's wall time the GPU ran kernels")
    parser.add_argument("--staggered", action="store_true",
                        help="also submit requests one per step, as a server would, and list the slow steps")
    args = parser.parse_args()

    llm = LLM(args.model, max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
              max_seq_len=args.input_len + args.output_len + 16, attention_backend=args.attention_backend,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
    prompts = load_prompts(args.num_requests, args.input_len, llm.compiled.vocab_size)
    params = SamplingParams(max_tokens=args.output_len, temperature=args.temperature, ignore_eos=True)
    llm.generate([p[::-1] for p in prompts[: args.max_batch_size]], params.model_copy(update={"max_tokens": 4}),
                 use_tqdm=False)  # fmt: skip
    totals, counts = collections.Counter(), collections.Counter()
    instrument(llm.engine, totals, counts)
    kinds = collections.Counter()
    step = llm.engine.step

    def counting_step():
        scheduled_before = llm.engine.runner.cuda_graphs.replays if llm.engine.runner.cuda_graphs else 0
        out = step()
        replays = llm.engine.runner.cuda_graphs.replays if llm.engine.runner.cuda_graphs else 0
        kinds["graph replay" if replays > scheduled_before else "compiled (prefill / mixed)"] += 1
        return out

    llm.engine.step = counting_step
    if args.trace_window:
        first, count = map(int, args.trace_window.split(":"))
        llm.engine.step = traced_window(counting_step, first, count)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{args.num_requests} requests, {tokens} output tokens in {elapsed:.2f} s: {tokens / elapsed:.0f} tok/s")
    print(f"steps: {dict(kinds)}")
    for name, seconds in totals.most_common():
        print(f"  {name:<30} {seconds:8.3f} s  {counts[name]:6d} calls  {1e3 * seconds / counts[name]:7.2f} ms/call")
    if args.staggered:
        staggered(llm, prompts, params, args.trace_step)
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        short = params.model_copy(update={"max_tokens": 12})
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate([p[1:] + p[:1] for p in prompts[: args.max_batch_size]], short, use_tqdm=False)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
        print(table)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
