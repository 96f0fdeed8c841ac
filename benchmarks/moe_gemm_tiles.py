"""The MoE grouped GEMMs' tuning candidates, timed per expert shape and row mode, with the bandwidth each reaches.

Each figure is the autotuner's own timing (autotune.tuner.cuda_timer: a CUDA graph over weight copies that overflow
L2, median of replays), after the candidate passed the tuning's reference check. The bandwidth counts the bytes a
call must read: the routed experts' weights (MXFP4: the bytes and exponents) for the call's pairs. A down GEMM's time
includes the sum over each token's k pairs: the sum kernel after it, or none for one token's `sum-` tiles, which sum
inside the GEMM.

    python benchmarks/moe_gemm_tiles.py --model gpt-oss-20b --format mxfp4 --rows 1,16 --json out.json
    python benchmarks/moe_gemm_tiles.py --model qwen3-30b-a3b --format float --rows 1,16 --json out.json

With --cache-dir, the winners stay in that kernel cache: a later `compiled-llm bench --cache-dir` of the model runs
them (autotune=cache), without the full tuning run of every bucket.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from autotune.kernel_cache import KernelCache
from autotune.tuner import tune
from custom_ops.moe.tuning import MoeGroupedGemmTuning, tokens_for

# name: (experts, hidden, intermediate, top_k)
MODELS = {
    "gpt-oss-20b": (32, 2880, 2880, 4),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "deepseek-v2-lite": (64, 2048, 1408, 6),
}


def bytes_read(bucket: dict, fmt: str, dtype: torch.dtype) -> int:
    """Weight bytes a call reads: each distinct routed expert once (a decode step's k experts are distinct)."""
    experts, n, k, top_k = bucket["experts"], bucket["n"], bucket["k"], bucket["top_k"]
    tokens = tokens_for(bucket["rows"], experts, top_k)
    used = min(experts, tokens * top_k)
    per_weight = {"mxfp4": 0.5 + 1 / 32, "fp8": 1}.get(fmt, dtype.itemsize)
    return int(used * n * k * per_weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt-oss-20b")
    parser.add_argument("--format", choices=("float", "fp8", "mxfp4"), default="mxfp4")
    parser.add_argument("--rows", default="1,16,64", help="row modes: 1 (one token) and block heights 16, 32, 64")
    parser.add_argument("--json", help="write the timings here")
    parser.add_argument("--cache-dir", help="keep the winners in this kernel cache (default: a temporary one)")
    args = parser.parse_args()
    experts, hidden, inter, top_k = MODELS[args.model]
    tuning, dtype = MoeGroupedGemmTuning(), torch.bfloat16
    results = []
    with tempfile.TemporaryDirectory() as temporary:
        cache = KernelCache(args.cache_dir or temporary, "cuda")
        for gated, n, k in ((True, 2 * inter, hidden), (False, hidden, inter)):
            for rows in (int(r) for r in args.rows.split(",")):
                bucket = {"experts": experts, "n": n, "k": k, "gated": gated, "fp8": args.format == "fp8",
                          "top_k": top_k, "rows": rows, **({"mxfp4": True} if args.format == "mxfp4" else {})}  # fmt: skip
                choice = tune(tuning, bucket, dtype, cache)
                gbytes = bytes_read(bucket, args.format, dtype) / 1e9
                name = "gate_up" if gated else "down"
                print(f"\n{args.model} {name} [{experts}, {n}, {k}] {args.format} rows={rows}: {gbytes * 1e3:.1f} MB")
                for candidate, us in sorted(choice.times_us.items(), key=lambda kv: kv[1]):
                    print(f"  {candidate:32s} {us:9.1f} us  {gbytes / (us * 1e-6):7.0f} GB/s")
                results.append({"gemm": name, "bucket": bucket, "bytes": gbytes * 1e9, "times_us": choice.times_us,
                                "winner": choice.candidate.name, "heuristic": tuning.heuristic(bucket)})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "format": args.format, "gpu": torch.cuda.get_device_name(),
                       "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
