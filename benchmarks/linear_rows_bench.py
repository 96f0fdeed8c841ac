"""bf16 linears of a decode batch (2 to 64 rows) at Llama-3.1-8B's shapes: cuBLAS (F.linear, then the activation's
Triton kernel for gate/up) against the decode GEMM (custom_ops/linear/triton_decode_gemm.py) at each tile its tuning
tries (decode_gemm_tuning.TILES_16BIT), µs a call, CUDA-graph replay over weights that overflow L2, and each one's
weight bytes over its time.

    python benchmarks/linear_rows_bench.py --rows 16,64 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F
from graph_timing import time_graph  # benchmarks/ (the script's own directory)

import custom_ops  # noqa: F401  (registers the ops)
from custom_ops.linear import op
from custom_ops.linear.decode_gemm_tuning import TILES_16BIT, tile_name
from custom_ops.linear.triton_decode_gemm import DECODE_TILE_16BIT, decode_gemm

L2_OVERFLOW_BYTES = 200 << 20
SHAPES = {  # name: (weight rows, K, gated)
    "qkv": (6144, 4096, False),
    "o": (4096, 4096, False),
    "gate_up": (28672, 4096, True),
    "down": (4096, 14336, False),
    "lm_head": (128256, 4096, False),
}


def per_call(fn, weights: list[torch.Tensor]) -> float:
    def body():
        for w in weights:
            fn(w)

    return time_graph(body, len(weights))


def bench_shape(name: str, n: int, k: int, gated: bool, rows: tuple[int, ...]) -> list[dict]:
    copies = max(2, -(-L2_OVERFLOW_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cublas = functools.partial(op.cublas_linear_silu_mul, x, bias=None) if gated else functools.partial(F.linear, x)
        row = {"shape": name, "n": n, "k": k, "rows": m, "cublas": per_call(cublas, weights)}
        expected = cublas(weights[0]).float()
        for tile in TILES_16BIT:
            tile = DECODE_TILE_16BIT | tile
            if gated and tile["SPLIT_K"] > 1:
                continue
            try:
                actual = decode_gemm(x, weights[0], None, torch.bfloat16, silu_mul=gated, **tile).float()
                error = ((actual - expected).abs().max() / expected.abs().max()).item()
                if error > 2.0**-6:
                    row[tile_name(tile, DECODE_TILE_16BIT)] = f"wrong ({error:.3g})"
                    continue
                row[tile_name(tile, DECODE_TILE_16BIT)] = per_call(
                    lambda w, x=x, tile=tile: decode_gemm(x, w, None, torch.bfloat16, silu_mul=gated, **tile), weights
                )
            except Exception as error:  # noqa: BLE001  (a tile over the shared memory: reported)
                row[tile_name(tile, DECODE_TILE_16BIT)] = f"{type(error).__name__}"
        times = {key: t for key, t in row.items() if key not in ("shape", "n", "k", "rows") and isinstance(t, float)}
        best = min((t, key) for key, t in times.items() if key != "cublas")
        row["best"], row["best_vs_cublas"] = best[1], row["cublas"] / best[0]
        row["cublas_GBps"] = n * k * 2 / row["cublas"] / 1e3
        row["best_GBps"] = n * k * 2 / best[0] / 1e3
        print(f"{name:8s} rows {m:3d}: cuBLAS {row['cublas']:7.1f} us ({row['cublas_GBps']:5.0f} GB/s), best "
              f"{best[1]} {best[0]:7.1f} us ({row['best_GBps']:5.0f} GB/s): {row['best_vs_cublas']:.2f}x", flush=True)  # fmt: skip
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="16,32,64", help="row counts (2 to 64)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = tuple(int(r) for r in args.rows.split(","))
    results = []
    for name in args.shapes.split(","):
        results += bench_shape(name, *SHAPES[name], rows)
    print(f"on {torch.cuda.get_device_name()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
