"""FP8 linears against bf16, per call, on the linears of Llama-3.1-8B (fused qkv and gate/up), from decode rows to
prefill chunks: which `compiled_llm::fp8_linear` backend to run per row count, and what each costs.

Columns (microseconds per call, replayed in a CUDA graph over enough weight copies to overflow L2, as a step
streams its layers' weights; benchmarks/graph_timing.py):
  bf16_torch   F.linear (cuBLAS) on the bf16 weight
  bf16_triton  compiled_llm::linear's triton backend (the bf16 GEMV up to 8 rows)
  fp8_scaled_mm  fp8_linear's `scaled_mm` backend: torch ops quantize x, then torch._scaled_mm
  fp8_triton   fp8_linear's `triton` backend: one quantizing kernel, then the decode GEMM (up to 16 rows) or _scaled_mm
  gemm_only    torch._scaled_mm over an x quantized beforehand: what the quantization costs is the difference
  gemm_tensorwise  the same GEMM with one scale per operand (cuBLASLt's own scaling): what row scales cost

    python benchmarks/fp8_linear_bench.py --json out.json            # every row count
    python benchmarks/fp8_linear_bench.py --decode --json out.json   # decode rows: the decode GEMM's tile grid
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from graph_timing import time_graph  # benchmarks/ (the script's own directory)

import custom_ops  # noqa: F401  (registers the ops)
from custom_ops.linear import triton_decode_gemm, triton_w8a8
from custom_ops.linear.fp8 import quantize_rows, quantize_weight
from custom_ops.linear.fp8_block import quantize_weight_blocks
from custom_ops.linear.triton_fp8_block import fp8_block_gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
ROWS = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384)
L2_OVERFLOW_BYTES = 400_000_000


def per_call(fn, operands, repeats: int = 20) -> float:
    def body():
        for args in operands:
            fn(*args)

    return time_graph(body, len(operands), repeats)


def weight_copies(n: int, k: int) -> tuple[list, list, int]:
    """(bf16 weights [n, k], as many (W8, s_w) as it takes to overflow L2, that count): half as many bf16 copies,
    which are twice the bytes."""
    copies = max(2, -(-L2_OVERFLOW_BYTES // (n * k)))
    bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(max(2, copies // 2))]
    fp8 = [quantize_weight(w) for w in bf16]
    return bf16, (fp8 * (copies // len(fp8) + 1))[:copies], copies


def bench_shape(name: str, n: int, k: int) -> list[dict]:
    bf16, fp8, _ = weight_copies(n, k)
    results = []
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x8, sx = quantize_rows(x)
        row = {"shape": name, "n": n, "k": k, "rows": m}
        row["bf16_torch"] = per_call(F.linear, [(x, w) for w in bf16])
        row["bf16_triton"] = per_call(lambda x, w: torch.ops.compiled_llm.linear(x, w, None, "triton"), [(x, w) for w in bf16])
        for backend in ("scaled_mm", "triton"):
            row[f"fp8_{backend}"] = per_call(
                lambda x, w, s, b=backend: torch.ops.compiled_llm.fp8_linear(x, w, s, None, None, b),
                [(x, w, s) for w, s in fp8],
            )  # fmt: skip
        row["gemm_only"] = per_call(
            lambda w, s, x8=x8, sx=sx: torch._scaled_mm(x8, w.t(), scale_a=sx, scale_b=s.view(1, -1), out_dtype=torch.bfloat16),
            list(fp8),
        )  # fmt: skip
        one = torch.ones((), device="cuda")
        row["gemm_tensorwise"] = per_call(  # one scale per operand: cuBLASLt's own FP8 scaling, for comparison
            lambda w, s, x8=x8, one=one: torch._scaled_mm(x8, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            list(fp8),
        )
        fp8_bytes = n * k + m * k * 2 + m * n * 2
        row["fp8_triton_GBps"] = fp8_bytes / row["fp8_triton"] / 1e3
        results.append(row)
        shown = {key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}
        print(json.dumps(shown), flush=True)
    return results


DECODE_ROWS = (1, 2, 4, 8, 16, 32, 64)  # the op takes the decode GEMM up to triton_decode_gemm.MAX_ROWS
DECODE_TILES = [
    {"BLOCK_N": n, "BLOCK_K": k, "num_stages": s, "num_warps": 4, "PREFETCH": 0}
    for (n, k) in ((32, 256), (32, 512), (64, 128), (64, 256), (128, 128)) for s in (3, 5)
] + [{"BLOCK_N": 64, "BLOCK_K": 256, "num_stages": 5, "num_warps": 4, "PREFETCH": p} for p in (1, 2, 4)] + [
    {"BLOCK_N": 64, "BLOCK_K": 256, "num_stages": 5, "num_warps": 4, "PREFETCH": p, "SPLIT_K": s}
    for s in (2, 4) for p in (0, 2)
]
DECODE_TILES = [triton_decode_gemm.DECODE_TILE | tile for tile in DECODE_TILES]  # complete, so the default is found by key


BLOCK_DECODE_TILES = [{"BLOCK_N": n, "num_stages": s, "num_warps": 4} for n in (64, 128) for s in (4, 6, 8)]


def bench_decode_shape(name: str, n: int, k: int, rows: tuple[int, ...], with_block: bool) -> list[dict]:
    """Decode rows: triton_decode_gemm.decode_gemm's tiles over rows quantized beforehand, beside the bf16 GEMV, the
    whole op (quantizing kernel + decode GEMM) and cuBLASLt."""
    bf16, fp8, copies = weight_copies(n, k)
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x8, sx = quantize_rows(x)
        row = {"shape": name, "n": n, "k": k, "rows": m}
        row["bf16_torch"] = per_call(F.linear, [(x, w) for w in bf16])
        if m <= 8:
            row["bf16_triton"] = per_call(
                lambda x, w: torch.ops.compiled_llm.linear(x, w, None, "triton"), [(x, w) for w in bf16]
            )
        row["fp8_triton"] = per_call(lambda x, w, s: torch.ops.compiled_llm.fp8_linear(x, w, s, None, None, "triton"),
                                     [(x, w, s) for w, s in fp8])  # fmt: skip
        row["quantize_only"] = per_call(lambda x: triton_w8a8.quantize_rows(x, None), [(x,)] * 8)
        row["gemm_only"] = per_call(
            lambda w, s, x8=x8, sx=sx: torch._scaled_mm(x8, w.t(), scale_a=sx, scale_b=s.view(1, -1), out_dtype=torch.bfloat16),
            list(fp8),
        )  # fmt: skip
        one = torch.ones((), device="cuda")
        row["gemm_tensorwise"] = per_call(
            lambda w, s, x8=x8, one=one: torch._scaled_mm(x8, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            list(fp8),
        )  # fmt: skip
        grid = {}
        for tile in DECODE_TILES:
            try:
                grid[str(tile)] = per_call(
                    lambda w, s, tile=tile, x8=x8, sx=sx: triton_decode_gemm.decode_gemm(
                        x8, w, None, torch.bfloat16, sx, s, **tile
                    ),
                    list(fp8), repeats=5,
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001  (a tile over the shared memory: skipped)
                grid[str(tile)] = type(error).__name__
        timed = {key: v for key, v in grid.items() if isinstance(v, float)}
        best = min(timed, key=timed.get)
        row["decode_gemm_default"] = grid.get(str(triton_decode_gemm.DECODE_TILE))
        row["decode_gemm_best"], row["decode_gemm_best_tile"], row["decode_gemm_grid"] = timed[best], best, grid
        row["decode_gemm_GBps"] = (n * k + m * k + m * n * 2) / timed[best] / 1e3
        blocks = [quantize_weight_blocks(w.float()) for w in bf16] if with_block else []  # fp8_block's swapped tiles
        blocks = (blocks * (copies // max(len(blocks), 1) + 1))[:copies]
        block_grid = {}
        for tile in BLOCK_DECODE_TILES if with_block else ():
            try:
                block_grid[str(tile)] = per_call(
                    lambda w, s, tile=tile, x=x: fp8_block_gemm(x, w, s, None, swapped=True, **tile), list(blocks), repeats=5
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001  (a tile over the shared memory: skipped)
                block_grid[str(tile)] = type(error).__name__
        block_timed = {key: v for key, v in block_grid.items() if isinstance(v, float)}
        if block_timed:
            row["fp8_block_unswapped"] = per_call(lambda w, s, x=x: fp8_block_gemm(x, w, s, None), list(blocks))
            row["fp8_block_best"] = min(block_timed.values())
            row["fp8_block_best_tile"], row["fp8_block_grid"] = min(block_timed, key=block_timed.get), block_grid
        results.append(row)
        shown = {key: round(v, 2) if isinstance(v, float) else v for key, v in row.items() if not key.endswith("_grid")}
        print(json.dumps(shown), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--decode", action="store_true", help="decode rows: the tensor-core kernel's tile grid")
    parser.add_argument("--rows", type=lambda text: tuple(int(r) for r in text.split(",")), default=DECODE_ROWS,
                        help=f"--decode: these row counts (default {','.join(map(str, DECODE_ROWS))})")
    parser.add_argument("--no-block", action="store_true", help="--decode: leave out fp8_block's swapped kernel")
    args = parser.parse_args()
    if args.decode:
        rows = [r for name, (n, k) in SHAPES.items() for r in bench_decode_shape(name, n, k, args.rows, not args.no_block)]
    else:
        rows = [r for name, (n, k) in SHAPES.items() for r in bench_shape(name, n, k)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
