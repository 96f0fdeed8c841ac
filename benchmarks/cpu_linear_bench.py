"""float32 linears on a CPU: oneDNN's matmul (`mkldnn._linear_pointwise` over the plain weight, what
`linear_backend='onednn'` runs) against F.linear (MKL), per weight shape and row count. Each call gets a
weight of its own from a set larger than the caches, as a decode step's layers do. The rule
`custom_ops.linear.onednn_is_faster` came from this table (BENCHMARKS.md).

    python benchmarks/cpu_linear_bench.py [--rows 1,16,128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from custom_ops.linear import onednn_is_faster

# SmolLM2-135M's (qkv, o, gate/up, down, LM head), then larger square, deep and wide ones.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (2048, 2048), (1024, 4096),
          (4096, 1024), (6144, 2048), (2048, 8192)]  # fmt: skip


def per_call_us(fn, weights: list[torch.Tensor], repeats: int = 3) -> float:
    fn(weights[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for weight in weights:
            fn(weight)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16,128", help="row counts (tokens of a step), comma-separated")
    args = parser.parse_args()
    onednn = torch.ops.mkldnn._linear_pointwise.default
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'rows':>5} {'N':>6} {'K':>6} {'F.linear us':>12} {'oneDNN us':>10} {'speedup':>8}  onednn_is_faster")
    for rows in (int(r) for r in args.rows.split(",")):
        for n, k in SHAPES:
            weights = [torch.randn(n, k) for _ in range(max(2, 200_000_000 // (n * k * 4)))]
            x = torch.randn(rows, k)
            ours, theirs = [], []
            for _ in range(3):  # interleaved, so that drift hits both
                theirs.append(per_call_us(lambda w: F.linear(x, w), weights))
                ours.append(per_call_us(lambda w: onednn(x, w, None, "none", [], ""), weights))
            theirs_us, ours_us = statistics.median(theirs), statistics.median(ours)
            print(f"{rows:>5} {n:>6} {k:>6} {theirs_us:>12.1f} {ours_us:>10.1f} {theirs_us / ours_us:>7.2f}x  "
                  f"{onednn_is_faster(n, k)}")  # fmt: skip


if __name__ == "__main__":
    main()
