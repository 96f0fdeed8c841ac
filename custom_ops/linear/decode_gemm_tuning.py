"""The decode GEMM's candidates for the autotuner (autotune.tuner.OpTuning): a tile per weight shape [N, K] and row
bucket (16, 32 or 64 rows: what x is padded to), one tuning per operand format.

- 8-bit (W8A8): the calls of a graph's `triton` `fp8_linear` and `fp8_linear_quantized` (op "fp8_decode_gemm"), or
  `int8_linear` and `int8_linear_quantized` (op "int8_decode_gemm"). The fallback is DECODE_TILE (what runs untuned);
  the others are the tiles and splits that won a shape or a row count on the H200 in FP8
  (benchmarks/fp8_linear_bench.py --decode; BENCHMARKS.md), int8 not timed yet. A winner is installed in
  triton_decode_gemm.TUNED_TILES.
- 16-bit (op "linear_rows"): a graph's `triton` `linear` and `linear_silu_mul` at 2 to 64 rows. The fallback, and
  what runs untuned, is cuBLAS (then the activation's kernel); the candidates are the decode GEMM's 16-bit tiles,
  the activation in their epilogue. A winner is installed in op.TUNED_ROWS (a tile, or None for cuBLAS).

Every later call of that shape and format on that device reads the installed choice, CUDA-graph captures included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from autotune.kernel_cache import source_hash
from autotune.select import device_index, graph_value, register
from autotune.tuner import Candidate, input_copies
from custom_ops.linear import fp8, int8, op, triton_decode_gemm, triton_decode_gemm_kernels
from custom_ops.linear.gemv_tuning import CUBLAS, OneRowLinearTuning, cublas
from custom_ops.linear.triton_decode_gemm import DECODE_TILE, DECODE_TILE_16BIT, decode_gemm

ROW_BUCKETS = (16, 32, 64)
TILES = (
    DECODE_TILE,  # the fallback: first
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 3},  # gate/up at 1 and 64 rows
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 5},
    {"BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 3},  # gate/up at 32 rows
    {"BLOCK_N": 32, "BLOCK_K": 512, "num_stages": 5},
    {"SPLIT_K": 2},  # down at 32 and 64 rows
    {"SPLIT_K": 4},  # o and down at 1 and 16 rows
    {"SPLIT_K": 4, "PREFETCH": 2},
)
# The 16-bit tiles: the 8-bit ones' bytes a stage (half the columns), where shared memory holds their stages with 64
# rows of x and, for the activation, two weight tiles (a tile that does not fit is out of that bucket's tuning).
TILES_16BIT = (
    DECODE_TILE_16BIT,
    {"num_stages": 3},
    {"BLOCK_K": 64, "num_stages": 6},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_stages": 4, "num_warps": 8},
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_stages": 4},
    {"BLOCK_N": 16, "BLOCK_K": 256, "num_stages": 4},  # mma.sync: twice the programs of 32, for narrow weights
    {"SPLIT_K": 2},  # K split: the programs of a narrow, deep weight (down) over more of the GPU
    {"SPLIT_K": 4},
    {"SPLIT_K": 4, "PREFETCH": 2},
)
# Any change to the kernel's file or its launcher's is a changed candidate.
_SOURCE = source_hash("".join(Path(m.__file__).read_text() for m in (triton_decode_gemm, triton_decode_gemm_kernels)))


def tile_name(tile: dict, default: dict = DECODE_TILE) -> str:
    """{"BLOCK_N": 64, "BLOCK_K": 256, "num_stages": 5, ...} -> "n64-k256-s5-w4" (+ "-split4", "-prefetch2")."""
    tile = default | tile
    name = f"n{tile['BLOCK_N']}-k{tile['BLOCK_K']}-s{tile['num_stages']}-w{tile['num_warps']}"
    name += f"-split{tile['SPLIT_K']}" if tile["SPLIT_K"] > 1 else ""
    return name + (f"-prefetch{tile['PREFETCH']}" if tile["PREFETCH"] else "")


def _run(x8, x_scale, weight, weight_scale, out_dtype, tile: dict) -> torch.Tensor:
    return decode_gemm(x8, weight, None, out_dtype, x_scale, weight_scale, **tile)


class W8A8DecodeGemmTuning:
    """autotune.tuner.OpTuning of triton_decode_gemm.decode_gemm over `quantized` ("fp8" or "int8") operands; bucket
    {"n", "k", "rows"}."""

    def __init__(self, quantized: str) -> None:
        self.int8 = quantized == "int8"
        self.op = f"{quantized}_decode_gemm"  # fp8_decode_gemm, as its kernel cache entries have always been named
        self.linears = _INT8_LINEARS if self.int8 else _FP8_LINEARS

    def candidates(self, bucket: dict) -> list[Candidate]:
        tiles = [DECODE_TILE | tile for tile in TILES]
        return [Candidate(tile_name(t), functools.partial(_run, tile=t), _SOURCE, t) for t in tiles]

    def heuristic(self, bucket: dict) -> str:
        return tile_name(DECODE_TILE)

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
        operands = "int8" if self.int8 else "fp8"
        index = device_index(device)
        key = triton_decode_gemm.tuned_tile_key(index, bucket["n"], bucket["k"], bucket["rows"], operands)
        triton_decode_gemm.TUNED_TILES[key] = dict(candidate.config)


# (the op, the op over rows quantized already): the weight is the former's second argument, the latter's third
_FP8_LINEARS = (torch.ops.compiled_llm.fp8_linear.default, torch.ops.compiled_llm.fp8_linear_quantized.default)
_INT8_LINEARS = (torch.ops.compiled_llm.int8_linear.default, torch.ops.compiled_llm.int8_linear_quantized.default)


def _rows_gemm(x, weight, silu_mul: bool, tile: dict) -> torch.Tensor:
    return decode_gemm(x, weight, None, x.dtype, silu_mul=silu_mul, **tile)


class LinearRowsTuning(OneRowLinearTuning):
    """autotune.tuner.OpTuning of the 16-bit linear at 2 to 64 rows: cuBLAS or the decode GEMM's tiles; bucket
    {"n", "k", "silu_mul", "rows"} (n: the weight's rows, both halves where silu_mul). Its inputs, reference and
    tolerance are the one-row linear's, at the bucket's rows."""

    op = "linear_rows"

    def candidates(self, bucket: dict) -> list[Candidate]:
        found = [Candidate(CUBLAS, cublas, f"torch{torch.__version__}")]
        for tile in TILES_16BIT:
            tile = DECODE_TILE_16BIT | tile
            if not (bucket.get("silu_mul") and tile["SPLIT_K"] > 1):  # the activation's epilogue takes no split
                found.append(Candidate(tile_name(tile, DECODE_TILE_16BIT), functools.partial(_rows_gemm, tile=tile),
                                       _SOURCE, tile, dtypes=(torch.bfloat16, torch.float16)))  # fmt: skip
        return found

    def heuristic(self, bucket: dict) -> str:
        return CUBLAS

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        """A bucket per weight shape of the graph's 16-bit `triton` linears (with or without the activation) and per
        row bucket."""
        weights = [(graph_value(gm, weight), silu_mul) for weight, silu_mul in op.triton_linears(gm.graph)]
        found = {(*weight.shape, silu_mul) for weight, silu_mul in weights if weight.dtype.itemsize == 2}
        return [{"n": n, "k": k, "silu_mul": s, "rows": r} for n, k, s in sorted(found) for r in ROW_BUCKETS]

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        tile = None if candidate.name == CUBLAS else dict(candidate.config)
        key = (device_index(device), bucket["n"], bucket["k"], bucket["rows"], bucket["silu_mul"])
        op.TUNED_ROWS[key] = tile


register(W8A8DecodeGemmTuning("fp8"))
register(W8A8DecodeGemmTuning("int8"))
register(LinearRowsTuning())
