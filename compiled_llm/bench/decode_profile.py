"""Where the decode steps of `bench --mode latency --profile` go: on a GPU the kernels (count, device time, the GPU's
idle time between them, the runner's annotated host phases), on a CPU the host's ops by self time."""

from __future__ import annotations

from collections.abc import Callable

import torch


def covered_time(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (begin, end) intervals: the time some kernel ran."""
    busy, covered_until = 0.0, float("-inf")
    for begin, end in sorted(intervals):
        if end > covered_until:
            busy += end - max(begin, covered_until)
            covered_until = end
    return busy


def profile_decode(generate: Callable[[int], object], prompt_len: int, steps: int = 8) -> dict:
    """Kernels of `steps` decode steps (torch profiler) of `generate(n)` (n tokens after a prompt of `prompt_len`):
    count and device time per kernel, how long the GPU sat idle between kernels, and host time in the runner's
    annotated phases."""
    from torch.profiler import ProfilerActivity, profile

    generate(2)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        generate(steps + 1)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    intervals, phases = [], {}
    for event in prof.events():
        if event.name.startswith("compiled_llm."):  # our record_function ranges (they show on the GPU too)
            if event.device_type != torch.autograd.DeviceType.CUDA:
                phases[event.name] = phases.get(event.name, 0.0) + event.cpu_time_total
        elif event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time)  # microseconds
            intervals.append((event.time_range.start, event.time_range.end))
    busy = covered_time(intervals)
    span = max(end for _, end in intervals) - min(begin for begin, _ in intervals) if intervals else 0.0
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    device_time = sum(sum(t) for t in kernels.values())
    return {
        "note": f"{steps} decode steps plus one prefill step of {prompt_len} tokens",
        "steps": steps + 1,
        "kernels_total": sum(len(t) for t in kernels.values()),
        "device_time_us": device_time,
        # Kernel time spent beside another kernel: under programmatic dependent launch a kernel starts before the one
        # it waits for ends, and its duration includes that wait, so per-kernel times then do not add up to a step
        "overlap_us": device_time - busy,
        "gpu_span_us": span,
        "gpu_idle_us": span - busy,
        "host_phases_us": phases,
        "top": [{"kernel": name[:120], "count": len(t), "total_us": sum(t)} for name, t in rows[:25]],
    }


def profile_decode_cpu(generate: Callable[[int], object], prompt_len: int, steps: int = 16) -> dict:
    """Where the host's time goes in `steps` decode steps of `generate(n)` (n tokens after a prompt of `prompt_len`)
    on a CPU (torch profiler, ops by self time; with Inductor's generated kernels under their own names where it
    profiles them)."""
    from torch.profiler import ProfilerActivity, profile

    generate(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(steps + 1)
    rows = sorted(prof.key_averages(), key=lambda row: -row.self_cpu_time_total)
    total = sum(row.self_cpu_time_total for row in rows)
    return {
        "note": f"{steps} decode steps plus one prefill step of {prompt_len} tokens, under the profiler",
        "host_ms_per_step": total / 1e3 / (steps + 1),
        "top": [{"op": row.key[:80], "calls": row.count, "self_ms": row.self_cpu_time_total / 1e3,
                 "share": row.self_cpu_time_total / total} for row in rows[:15]],  # fmt: skip
    }
