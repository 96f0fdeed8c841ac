"""tensor_parallel_size=1 inside a torch.distributed group of one against the plain single-GPU path, in one process:
batch-1 decode of `bench --mode latency`, first without a process group, then after init_process_group (NCCL on a
GPU, gloo on CPU) with world size 1. With one rank no shard pass changes the graph and no collective is inserted
(parallel_ranks.parallel_rank), so the two should be the same within noise; this measures it.

    python benchmarks/tp1_distributed.py random:llama-3.1-8b [bench flags...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from compiled_llm.cli import main as cli_main


def decode_speed(model: str, flags: list[str]) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args = ["bench", model, "--mode", "latency", "--batch-size", "1", "--baselines", "none", "--json", out.name]
        if cli_main(args + ["--tensor-parallel-size", "1", *flags]) != 0:
            raise SystemExit("the bench failed")
        return json.load(open(out.name))["results"][0]["decode_tokens_per_s"]


def run() -> None:
    model, flags = sys.argv[1], sys.argv[2:]
    plain = decode_speed(model, flags)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    try:
        grouped = decode_speed(model, flags)
    finally:
        dist.destroy_process_group()
    print(f"decode tok/s: plain {plain:.1f}, in a process group of one {grouped:.1f}: {grouped / plain:.3f}x")


if __name__ == "__main__":
    run()
