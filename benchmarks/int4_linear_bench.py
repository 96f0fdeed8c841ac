"""4-bit weight-only linears (int4 W4A16, NVFP4) against bf16, per call, on the linears of Llama-3.1-8B (fused qkv and gate/up), from decode
rows to prefill chunks: what `compiled_llm::int4_linear`'s triton backend costs, and how close its one-row GEMV comes
to the bytes it must read.

Columns (microseconds per call, replayed in a CUDA graph over enough weight copies to overflow L2, as a step
streams its layers' weights; benchmarks/graph_timing.py):
  bf16_torch    F.linear (cuBLAS) on the bf16 weight
  bf16_triton   compiled_llm::linear's triton backend (the bf16 GEMV up to 8 rows)
  int4_triton   int4_linear's triton backend untuned, groups of 128, an AWQ smooth of one part per weight: up to 16
                rows the Gluon tensor-core decode (gluon_int4.mma_default's launch), else Triton's tensor-core GEMM
  int4_kernels  the Triton kernels' own launch ({"MMA": False}): the GEMV for one row, the tensor-core GEMM for more
  int4_plain    int4_triton without a smooth: what multiplying x by it costs
  int4_offsets  int4_triton over float offsets (w = q s + m, int4_awq's own storage) instead of zero points
  int4_GBps     one row: the int4 weight's bytes (codes, scales, zeros) over int4_triton's time
  nvfp4_triton  nvfp4_linear's triton backend untuned (E2M1 codes, an e4m3 scale per 16 columns), as int4_triton
  nvfp4_kernels its Triton kernels' own launch (GEMV / tensor-core GEMM)
  nvfp4_GBps    one row: the NVFP4 weight's bytes over nvfp4_triton's time
  q4_k_*        (--q4-k) GGUF Q4_K's form as it loads (gguf_blocks.q4_k_tensors: groups of 32, float32 scales and
                offsets, no smooth, random valid super-blocks): `q4_k` the default launch, `kernels` the Triton
                kernels' own, `fp16` and `fp16_kernels` the same with the scales and offsets in float16, `GBps` the
                default's bytes over its time, `mma_*` the tensor-core decode at each --mma-tiles launch

    python benchmarks/int4_linear_bench.py --json out.json
    python benchmarks/int4_linear_bench.py --rows 1 --gemv-tiles 16:2:4,32:2:4,16:2:4:ptx   # the GEMV's launches
                                                                        # (":ptx": the codes decoded in inline PTX)
    python benchmarks/int4_linear_bench.py --rows 1,8 --q4-k   # GGUF Q4_K's groups of 32 beside
    python benchmarks/int4_linear_bench.py --rows 1,8,16 --mma-tiles 16:4:2,32:8:2   # the Gluon tensor-core decode
                           # (gluon_int4.py) at ROWS:SPLIT:UNROLL[:prefetch][:preloadN], to 16 rows: int4 with the smooth
                           # (mma_*), NVFP4 without (nvfp4_mma_*)
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from graph_timing import time_graph  # benchmarks/ (the script's own directory)

import custom_ops  # noqa: F401  (registers the ops)
from custom_ops.linear import gluon_int4, nvfp4, triton_int4, triton_nvfp4
from custom_ops.linear.int4 import quantize_weight

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
ROWS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
L2_OVERFLOW_BYTES = 400_000_000
GROUP = 128
INT4_LINEAR = torch.ops.compiled_llm.int4_linear
NVFP4_LINEAR = torch.ops.compiled_llm.nvfp4_linear


def per_call(fn, operands, repeats: int = 20) -> float:
    def body():
        for args in operands:
            fn(*args)

    return time_graph(body, len(operands), repeats)


def weights(n: int, k: int) -> tuple[list, list, list, list]:
    """(bf16 weights [n, k], their int4 forms (qweight, scales, zeros) with zero points and with float offsets, their
    NVFP4 forms (codes, scales, global)) in as many copies as it takes to overflow L2 with the 4-bit ones (a quarter
    of those in bf16)."""
    copies = max(2, -(-L2_OVERFLOW_BYTES // (n * k // 2)))
    bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(max(2, copies // 4))]
    int4 = [quantize_weight(bf16[i % len(bf16)], GROUP) for i in range(copies)]
    offsets = [quantize_weight(bf16[i % len(bf16)], GROUP, offsets=True) for i in range(copies)]
    fp4 = [nvfp4.quantize_weight(bf16[i % len(bf16)]) for i in range(copies)]
    return bf16, int4, offsets, fp4


def q4_k_weights(n: int, k: int) -> list[tuple]:
    """GGUF Q4_K's int4_linear operands (codes, float32 scales, float32 offsets) of random valid super-blocks, in as
    many copies as overflow L2."""
    from compiled_llm.gguf_blocks import q4_k_tensors
    from compiled_llm.presets import random_q4_k_blocks

    copies = max(2, -(-L2_OVERFLOW_BYTES // (n * k * 3 // 4)))
    return [q4_k_tensors(random_q4_k_blocks(n, k, "cuda")) for _ in range(copies)]


def measure_q4_k(row: dict, x: torch.Tensor, q4_k: list[tuple], mma_tiles: list[dict]) -> None:
    """row's q4_k_* columns (module docstring), and q4_k_mma_* at each of `mma_tiles`."""
    group = 32
    kernels = triton_int4.int4_gemv if x.shape[0] == 1 else triton_int4.int4_gemm
    for suffix, cast in (("", torch.float32), ("_fp16", torch.float16)):
        operands = [(x, q, s.to(cast), m.to(cast)) for q, s, m in q4_k]
        row[f"q4_k{suffix}"] = per_call(lambda x, q, s, m: INT4_LINEAR(x, q, s, m, None, [], None, group, "triton"),
                                        operands)  # fmt: skip
        row[f"q4_k{suffix}_kernels"] = per_call(
            lambda x, q, s, m: kernels(x, q, s, m, None, [], None, group, MMA=False), operands
        )
    row["q4_k_GBps"] = sum(t.numel() * t.element_size() for t in q4_k[0]) / row["q4_k"] / 1e3
    for tile in mma_tiles if x.shape[0] <= gluon_int4.MAX_ROWS else ():
        key = "q4_k_mma_" + "_".join(f"{k_.lower()}{v}" for k_, v in tile.items())
        row[key] = per_call(lambda x, q, s, m, tile=tile: gluon_int4.int4_mma(x, q, s, m, None, [], None, group, **tile),
                            [(x, *w) for w in q4_k])  # fmt: skip


def measure(name: str, n: int, k: int, rows_list, tiles: list[dict], fp4_tiles: list[dict],
            mma_tiles: list[dict], q4_k: bool = False) -> list[dict]:  # fmt: skip
    bf16, int4, offsets, fp4 = weights(n, k)
    q4_k_forms = q4_k_weights(n, k) if q4_k else []
    smooth = torch.rand(1, k, device="cuda") + 0.5
    results = []
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        row = {"linear": name, "n": n, "k": k, "rows": rows}
        int4_kernels = triton_int4.int4_gemv if rows == 1 else triton_int4.int4_gemm
        nvfp4_kernels = triton_nvfp4.nvfp4_gemv if rows == 1 else triton_nvfp4.nvfp4_gemm
        row["bf16_torch"] = per_call(F.linear, [(x, w) for w in bf16])
        row["bf16_triton"] = per_call(lambda x, w: torch.ops.compiled_llm.linear(x, w, None, "triton"),
                                      [(x, w) for w in bf16])  # fmt: skip
        row["int4_triton"] = per_call(lambda x, q, s, z: INT4_LINEAR(x, q, s, z, smooth, [n], None, GROUP, "triton"),
                                      [(x, *w) for w in int4])  # fmt: skip
        row["int4_kernels"] = per_call(
            lambda x, q, s, z, kernels=int4_kernels: kernels(x, q, s, z, smooth, [n], None, GROUP, MMA=False),
            [(x, *w) for w in int4],
        )
        row["int4_plain"] = per_call(lambda x, q, s, z: INT4_LINEAR(x, q, s, z, None, [], None, GROUP, "triton"),
                                     [(x, *w) for w in int4])  # fmt: skip
        row["int4_offsets"] = per_call(lambda x, q, s, m: INT4_LINEAR(x, q, s, m, smooth, [n], None, GROUP, "triton"),
                                       [(x, *w) for w in offsets])  # fmt: skip
        nbytes = sum(t.numel() * t.element_size() for t in int4[0])
        row["int4_GBps"] = nbytes / row["int4_triton"] / 1e3
        row["nvfp4_triton"] = per_call(lambda x, q, s, g: NVFP4_LINEAR(x, q, s, g, None, [], None, "triton"),
                                       [(x, *w) for w in fp4])  # fmt: skip
        row["nvfp4_kernels"] = per_call(
            lambda x, q, s, g, kernels=nvfp4_kernels: kernels(x, q, s, g, None, [], None, MMA=False),
            [(x, *w) for w in fp4],
        )
        row["nvfp4_GBps"] = sum(t.numel() * t.element_size() for t in fp4[0][:2]) / row["nvfp4_triton"] / 1e3
        if q4_k_forms:
            measure_q4_k(row, x, q4_k_forms, mma_tiles)
        for tile in tiles if rows == 1 else ():
            key = "gemv_" + "_".join(f"{k_}{v}" for k_, v in tile.items())
            row[key] = per_call(lambda x, q, s, z, tile=tile: triton_int4.int4_gemv(x, q, s, z, smooth, [n], None,
                                                                                    GROUP, **tile),
                                [(x, *w) for w in int4])  # fmt: skip
        for tile in mma_tiles if rows <= gluon_int4.MAX_ROWS else ():
            key = "mma_" + "_".join(f"{k_.lower()}{v}" for k_, v in tile.items())
            row[key] = per_call(lambda x, q, s, z, tile=tile: gluon_int4.int4_mma(x, q, s, z, smooth, [n], None, GROUP,
                                                                                  **tile),
                                [(x, *w) for w in int4])  # fmt: skip
        for tile in mma_tiles if rows <= gluon_int4.MAX_ROWS else ():
            key = "nvfp4_mma_" + "_".join(f"{k_.lower()}{v}" for k_, v in tile.items())
            row[key] = per_call(lambda x, q, s, g, tile=tile: gluon_int4.nvfp4_mma(x, q, s, g, None, [], None, **tile),
                                [(x, *w) for w in fp4])  # fmt: skip
        for tile in fp4_tiles if rows == 1 else ():
            key = "nvfp4_gemv_" + "_".join(f"{k_}{v}" for k_, v in tile.items())
            row[key] = per_call(lambda x, q, s, g, tile=tile: triton_nvfp4.nvfp4_gemv(x, q, s, g, None, [], None, **tile),
                                [(x, *w) for w in fp4])  # fmt: skip
        results.append(row)
        print({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}, flush=True)
    return results


def mma_tile(spec: str) -> dict:
    """"32:8:2:prefetch:preload4" -> {"ROWS": 32, "SPLIT": 8, "UNROLL": 2, "PREFETCH": True, "PRELOAD": 4}."""
    numbers, flags = spec.split(":")[:3], spec.split(":")[3:]
    tile = dict(zip(("ROWS", "SPLIT", "UNROLL"), map(int, numbers)))
    for flag in flags:
        if flag == "prefetch":
            tile["PREFETCH"] = True
        elif flag.startswith("preload"):
            tile["PRELOAD"] = int(flag.removeprefix("preload"))
        else:
            raise SystemExit(f"--mma-tiles: unknown flag {flag!r} in {spec!r} (prefetch, preloadN)")
    return tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts (default: %(default)s)")
    parser.add_argument("--gemv-tiles", default="", help="BLOCK_N:GROUPS_A_STEP:num_warps[:ptx],... timed at one row")
    parser.add_argument(
        "--mma-tiles",
        default="",
        help="ROWS:SPLIT:UNROLL[:prefetch][:preloadN],... of the tensor-core decode, "
        "to 16 rows (:prefetch: the codes bulk-prefetched into L2 before the wait for the previous kernel; :preloadN: "
        "one row's first N steps' codes loaded into registers before it)",
    )
    parser.add_argument("--q4-k", action="store_true", help="add GGUF Q4_K's form (groups of 32, float32 scales)")
    parser.add_argument("--nvfp4-tiles", default="", help="BLOCK_N:GROUPS_A_STEP:num_warps,... of the NVFP4 GEMV")
    args = parser.parse_args()
    tiles = []
    for spec in filter(None, args.gemv_tiles.split(",")):
        block_n, groups, warps, *ptx = spec.split(":")
        tiles.append({"BLOCK_N": int(block_n), "GROUPS_A_STEP": int(groups), "num_warps": int(warps),
                      "PTX_DECODE": ptx == ["ptx"]})  # fmt: skip
    fp4_tiles = [dict(zip(("BLOCK_N", "GROUPS_A_STEP", "num_warps"), map(int, spec.split(":"))))
                 for spec in filter(None, args.nvfp4_tiles.split(","))]  # fmt: skip
    mma_tiles = [mma_tile(spec) for spec in filter(None, args.mma_tiles.split(","))]
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = [
        r for name, (n, k) in SHAPES.items() for r in measure(name, n, k, rows_list, tiles, fp4_tiles, mma_tiles, args.q4_k)
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
