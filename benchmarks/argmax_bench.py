"""Greedy sampling's argmax: torch.argmax against `argmax_rows` (two Triton launches), per call in a CUDA
graph, for the vocabularies of SmolLM2 (49,152), Llama-3 (128,256) and Qwen3 (151,936).

    python benchmarks/argmax_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from custom_ops.argmax import argmax_rows
from graph_timing import time_graph  # benchmarks/ (the script's own directory)


def time_per_call(fn, logits, calls: int = 20) -> float:
    """Microseconds per call of fn(logits), `calls` calls replayed as one CUDA graph."""

    def body():
        for _ in range(calls):
            fn(logits)

    return time_graph(body, calls, repeats=50)


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
