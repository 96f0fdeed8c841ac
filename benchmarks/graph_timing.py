"""Device time per call of a few kernels, as a decode step runs them: captured once as a CUDA graph
(after a warm-up on a side stream, which compiles and allocates) and replayed."""

from __future__ import annotations

from collections.abc import Callable

import torch


def time_graph(body: Callable[[], object], calls: int, repeats: int = 20) -> float:
    """Microseconds per call, where one run of `body` makes `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeats * calls)
