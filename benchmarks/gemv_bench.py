"""Few-row linears: cuBLAS (`torch.mm`) against the Triton GEMV, per call, as a decode step replays them.

Each figure is the time of one call inside a CUDA graph that calls the linear once for each of enough
weight copies to overflow L2 (as a decode step streams every layer's weights from memory), divided by
the number of calls. Shapes: the linears of SmolLM2-135M and Llama-3.1-8B (fused qkv and gate/up).

    python benchmarks/gemv_bench.py [--search] --json out.json
    python benchmarks/gemv_bench.py --silu-mul     # gate/up: GEMV + activation kernel vs the fused epilogue
    python benchmarks/gemv_bench.py --prefetch     # one row: how many weight columns to load before the PDL wait
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from custom_ops.linear.triton_gemv import MAX_ROWS, gemv, gemv_config
from custom_ops.linear.triton_silu_mul import triton_silu_mul
from graph_timing import time_graph  # benchmarks/ (the script's own directory)

SHAPES = {  # name: (N, K)
    "smollm2.qkv": (960, 576), "smollm2.o": (576, 576), "smollm2.gate_up": (3072, 576),
    "smollm2.down": (576, 1536), "smollm2.lm_head": (49152, 576),
    "llama8b.qkv": (6144, 4096), "llama8b.o": (4096, 4096), "llama8b.gate_up": (28672, 4096),
    "llama8b.down": (4096, 14336), "llama8b.lm_head": (128256, 4096),
    # GPT-OSS-20B's bf16 linears (its experts are MXFP4): K 2880 is no power of 2
    "gptoss20b.qkv": (5120, 2880), "gptoss20b.o": (2880, 4096), "gptoss20b.router": (32, 2880),
    "gptoss20b.lm_head": (201088, 2880),
}  # fmt: skip


def time_per_call(fn, weights, x, out, repeats: int = 20) -> float:
    """Microseconds per call of fn(x, w, out) over all `weights`, replayed as one CUDA graph."""

    def body():
        for w in weights:
            fn(x, w, out)

    return time_graph(body, len(weights), repeats)


def silu_mul_rows() -> list[dict]:
    """One-row gate/up projections: the GEMV then the activation kernel (two launches) against the GEMV
    with the SiLU epilogue, at the rule's tile and the best of a small grid."""
    rows = []
    for name in ("smollm2.gate_up", "llama8b.gate_up"):
        n, k = SHAPES[name]
        copies = max(4, -(-400_000_000 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, n // 2, device="cuda", dtype=torch.bfloat16)
        two = time_per_call(lambda x, w, o: triton_silu_mul(gemv(x, w)), weights, x, out)
        fused = time_per_call(lambda x, w, o: gemv(x, w, o, silu_mul=True), weights, x, out)
        grid = {}
        for block_n, block_k, warps in itertools.product((1, 2, 4, 8), (512, 1024), (4, 8)):
            config = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
            grid[str(config)] = time_per_call(
                lambda x, w, o, c=config: gemv(x, w, o, silu_mul=True, **dict(c)), weights, x, out, repeats=5
            )  # fmt: skip
        best = min(grid, key=grid.get)
        print(f"{name:<18} gemv+act {two:.2f} us  fused {fused:.2f} us  best fused {grid[best]:.2f} us {best}", flush=True)
        rows.append({"linear": name, "gemv_then_act_us": two, "fused_us": fused, "grid": grid})
        del weights
        torch.cuda.empty_cache()
    return rows


def prefetch_rows() -> list[dict]:
    """One-row linears (gate/up with its activation) at the rule's tile against loads of each program's
    weight rows in one piece before the PDL wait (PREFETCH_K = K rounded up to a power of two, K <= 4096),
    or, for a wider K, in longer tiles."""
    import triton

    rows = []
    for name, (n, k) in SHAPES.items():
        silu = name.endswith("gate_up")
        copies = max(4, -(-400_000_000 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, n // 2 if silu else n, device="cuda", dtype=torch.bfloat16)
        configs = [gemv_config(1, k, n // 2 if silu else n)]
        for block_n, warps, block_k in itertools.product((1, 2, 4), (4, 8), (1024, 2048, 4096)):
            whole = triton.next_power_of_2(k)
            if whole <= 4096:
                configs.append({"BLOCK_N": block_n, "BLOCK_K": whole, "PREFETCH_K": whole, "num_warps": warps})
            else:
                configs.append({"BLOCK_N": block_n, "BLOCK_K": block_k, "PREFETCH_K": block_k, "num_warps": warps})
        times = {}
        for config in {str(c): c for c in configs}.values():
            times[str(config)] = time_per_call(
                lambda x, w, o, c=config: gemv(x, w, o, silu_mul=silu, **dict(c)), weights, x, out, repeats=10
            )  # fmt: skip
        rule, best = str(configs[0]), min(times, key=times.get)
        gb = n * k * 2 / 1e3
        print(f"{name:<16} rule {times[rule]:.2f} us ({gb / times[rule]:.0f} GB/s)  best {times[best]:.2f} us "
              f"({gb / times[best]:.0f} GB/s) {best}", flush=True)  # fmt: skip
        rows.append({"linear": name, "N": n, "K": k, "rule": rule, "times_us": times})
        del weights
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", action="store_true", help="also time a grid of tile configs (one-row calls)")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--silu-mul", action="store_true", help="only the gate/up projections with their activation")
    parser.add_argument("--prefetch", action="store_true", help="only one-row calls, by PREFETCH_K")
    parser.add_argument("--models", default="smollm2,llama8b", help="which SHAPES, by the prefix of their names")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.silu_mul or args.prefetch:
        key, results = ("silu_mul", silu_mul_rows()) if args.silu_mul else ("prefetch", prefetch_rows())
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(device), key: results}, f, indent=2)
        return
    results = []
    print(f"{'linear':<18} {'M':>2} {'mm us':>8} {'gemv us':>8} {'GB/s mm':>8} {'GB/s gemv':>9}  best config")
    for (name, (n, k)), m in itertools.product(SHAPES.items(), [int(r) for r in args.rows.split(",")]):
        if m > MAX_ROWS or name.split(".")[0] not in args.models.split(","):
            continue
        copies = max(4, -(-400_000_000 // (n * k * 2)))
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
        expected = (x.double() @ weights[0].double().T).float()
        error = (gemv(x, weights[0]).float() - expected).abs().max().item()
        assert error < 2e-2, f"{name} M={m}: gemv off by {error}"
        mm = time_per_call(lambda x, w, o: torch.mm(x, w.t(), out=o), weights, x, out)
        ours = time_per_call(lambda x, w, o: gemv(x, w, o), weights, x, out)
        row = {"linear": name, "N": n, "K": k, "M": m, "mm_us": mm, "gemv_us": ours,
               "config": gemv_config(m, k, n)}  # fmt: skip
        if args.search and m == 1:
            best = (ours, row["config"])
            for block_n, block_k, warps in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8)):
                if block_k > max(128, k) or m * block_n * block_k > 16384:
                    continue
                config = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
                t = time_per_call(lambda x, w, o, c=config: gemv(x, w, o, **dict(c)), weights, x, out, repeats=5)
                if t < best[0]:
                    best = (t, config)
            row["best_us"], row["best_config"] = best
        results.append(row)
        gb = n * k * 2 / 1e3
        best = f"{row['best_us']:.2f} us {row['best_config']}" if "best_us" in row else ""
        print(f"{name:<18} {m:>2} {mm:>8.2f} {ours:>8.2f} {gb / mm:>8.0f} {gb / ours:>9.0f}  {best}", flush=True)
        del weights
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
