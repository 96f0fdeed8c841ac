"""Timing helpers shared by the benchmarks: device-synchronized wall clock, copy bandwidth, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return statistics.median(timed(fn, device) for _ in range(repeats))


def event_median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` on the current CUDA stream, each call between two CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        raise ValueError("copy bandwidth is measured on CUDA devices only")
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / event_median_s(lambda: dst.copy_(src), repeats)


def check_baselines(requested: tuple[str, ...], known: tuple[str, ...], mode: str, ranks: int = 1) -> None:
    unknown = [b for b in requested if b not in known]
    if unknown:
        raise ValueError(f"unknown baselines {unknown} for --mode {mode}; known: {', '.join(known)}")
    if ranks > 1 and requested:
        raise ValueError(f"the {', '.join(requested)} baseline runs the whole model in one process, which a run over "
                         f"{ranks} ranks does not have: pass --baselines none")  # fmt: skip
