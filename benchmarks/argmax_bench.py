"""Greedy sampling's argmax: torch.argmax against `argmax_rows` (two Triton launches), per call in a CUDA
graph, for the vocabularies of SmolLM2 (49,152), Llama-3 (128,256) and Qwen3 (151,936).

    python benchmarks/argmax_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from custom_ops.triton_argmax import argmax_rows


def time_per_call(fn, logits, repeats: int = 50, calls: int = 20) -> float:
    """Microseconds per call of fn(logits), replayed as one CUDA graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(logits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(logits)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeats * calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    for vocab in (49152, 128256, 151936):
        for rows in (1, 8, 64, 256):
            logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
            torch_us = time_per_call(lambda t: t.argmax(dim=-1), logits)
            ours_us = time_per_call(argmax_rows, logits)
            print(f"vocab {vocab:>6} rows {rows:>3}: torch.argmax {torch_us:7.2f} us  argmax_rows {ours_us:7.2f} us")
            results.append({"vocab": vocab, "rows": rows, "torch_us": torch_us, "argmax_rows_us": ours_us})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
