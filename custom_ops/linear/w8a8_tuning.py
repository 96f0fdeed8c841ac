"""The W8A8 decode GEMM's candidates for the autotuner (autotune.tuner.OpTuning), one tuning per format: a tile per
weight shape [N, K] and row bucket (16, 32 or 64 rows: what x is padded to), for the calls of a graph's `triton`
`fp8_linear` and `fp8_linear_quantized` (op "fp8_decode_gemm"), or `int8_linear` and `int8_linear_quantized` (op
"int8_decode_gemm").

The fallback is DECODE_TILE (what runs untuned); the others are the tiles and splits that won a shape or a row
count on the H200 in FP8 (benchmarks/fp8_linear_bench.py --decode; BENCHMARKS.md), int8 not timed yet. A winner is
installed in triton_w8a8.TUNED_TILES, which every later call of that shape and format on that device reads,
CUDA-graph captures included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from autotune.kernel_cache import source_hash
from autotune.select import device_index, graph_value, register
from autotune.tuner import Candidate, input_copies
from custom_ops.linear import fp8, int8, triton_w8a8, triton_w8a8_kernels

ROW_BUCKETS = (16, 32, 64)
TILES = (
    triton_w8a8.DECODE_TILE,  # the fallback: first
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 3},  # gate/up at 1 and 64 rows
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 5},
    {"BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 3},  # gate/up at 32 rows
    {"BLOCK_N": 32, "BLOCK_K": 512, "num_stages": 5},
    {"SPLIT_K": 2},  # down at 32 and 64 rows
    {"SPLIT_K": 4},  # o and down at 1 and 16 rows
    {"SPLIT_K": 4, "PREFETCH": 2},
)
# Any change to the kernels' file or their launcher's is a changed candidate.
_SOURCE = source_hash("".join(Path(m.__file__).read_text() for m in (triton_w8a8, triton_w8a8_kernels)))


def tile_name(tile: dict) -> str:
    """{"BLOCK_N": 64, "BLOCK_K": 256, "num_stages": 5, ...} -> "n64-k256-s5-w4" (+ "-split4", "-prefetch2")."""
    tile = triton_w8a8.DECODE_TILE | tile
    name = f"n{tile['BLOCK_N']}-k{tile['BLOCK_K']}-s{tile['num_stages']}-w{tile['num_warps']}"
    name += f"-split{tile['SPLIT_K']}" if tile["SPLIT_K"] > 1 else ""
    return name + (f"-prefetch{tile['PREFETCH']}" if tile["PREFETCH"] else "")


def _run(x8, x_scale, weight, weight_scale, out_dtype, tile: dict) -> torch.Tensor:
    return triton_w8a8.w8a8_decode_gemm(x8, x_scale, weight, weight_scale, None, out_dtype, **tile)


class W8A8DecodeGemmTuning:
    """autotune.tuner.OpTuning of triton_w8a8.w8a8_decode_gemm over `quantized` ("fp8" or "int8") operands; bucket
    {"n", "k", "rows"}."""

    def __init__(self, quantized: str) -> None:
        self.int8 = quantized == "int8"
        self.op = f"{quantized}_decode_gemm"  # fp8_decode_gemm, as its kernel cache entries have always been named
        self.linears = _INT8_LINEARS if self.int8 else _FP8_LINEARS

    def candidates(self, bucket: dict) -> list[Candidate]:
        tiles = [triton_w8a8.DECODE_TILE | tile for tile in TILES]
        return [Candidate(tile_name(t), functools.partial(_run, tile=t), _SOURCE, t) for t in tiles]

    def heuristic(self, bucket: dict) -> str:
        return tile_name(triton_w8a8.DECODE_TILE)

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        n, k, rows = bucket["n"], bucket["k"], bucket["rows"]
        copies = input_copies(n * k)
        device = torch.device("cuda", torch.cuda.current_device())
        sets = []
        quantized = int8 if self.int8 else fp8
        for _ in range(copies):
            # None: fp8's input scale (dynamic), int8's smooth (none)
            x8, x_scale = quantized.quantize_rows(torch.randn(rows, k, device=device, dtype=dtype), None)
            weight8, weight_scale = quantized.quantize_weight(torch.randn(n, k, device=device, dtype=dtype))
            sets.append((x8, x_scale, weight8, weight_scale, dtype))
        return sets

    def reference(self, x8, x_scale, weight, weight_scale, out_dtype) -> torch.Tensor:
        if self.int8:
            return int8.int8_linear_quantized_reference(x8, x_scale, weight, weight_scale, None, out_dtype)
        return fp8.fp8_linear_quantized_reference(x8, x_scale, weight, weight_scale, None, out_dtype)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return 2.0**-7, 2.0**-7  # one bf16 rounding of the output; the sums differ only in order

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        """A bucket per weight shape of the graph's `triton` linears of this format and per row bucket."""
        shapes = set()
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in self.linears or node.args[-1] != "triton":
                continue
            weight = node.args[1] if node.target is self.linears[0] else node.args[2]
            shapes.add(tuple(graph_value(gm, weight).shape))
        return [{"n": n, "k": k, "rows": rows} for n, k in sorted(shapes) for rows in ROW_BUCKETS]

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        key = triton_w8a8.tuned_tile_key(device_index(device), bucket["n"], bucket["k"], bucket["rows"], self.int8)
        triton_w8a8.TUNED_TILES[key] = dict(candidate.config)


# (the op, the op over rows quantized already): the weight is the former's second argument, the latter's third
_FP8_LINEARS = (torch.ops.compiled_llm.fp8_linear.default, torch.ops.compiled_llm.fp8_linear_quantized.default)
_INT8_LINEARS = (torch.ops.compiled_llm.int8_linear.default, torch.ops.compiled_llm.int8_linear_quantized.default)


register(W8A8DecodeGemmTuning("fp8"))
register(W8A8DecodeGemmTuning("int8"))
