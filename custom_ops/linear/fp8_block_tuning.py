"""The block-scaled FP8 GEMM's candidates for the autotuner (autotune.tuner.OpTuning): a kernel and tile per weight
shape [N, K] and row bucket (16, 32, 64 rows: a decode step's tokens, up to the next bucket), for the graph's
`fp8_block_linear` calls whose backend is `triton`.

The fallback is fp8_block_gemm_config's tile for the bucket (what runs untuned); the others are GEMM tiles with
fewer rows or narrower columns a program, and for up to 16 rows the swapped decode kernel (weights as the MMA's
wide operand), which is not the default until its GPU test has run: the tuner checks it against the reference on
the shape before it may win. A winner is installed in triton_fp8_block.TUNED_BLOCK_TILES, which every later call
of that shape and row bucket reads, CUDA-graph captures included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from autotune.kernel_cache import source_hash
from autotune.select import device_index, graph_value, register
from autotune.tuner import Candidate, input_copies
from custom_ops.linear import fp8_block, triton_fp8_block

OP = "fp8_block_gemm"
GEMM_TILES = (  # beside the heuristic's: narrower columns, fewer rows, more warps
    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4},
    {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8},
)
SWAPPED_TILES = (
    triton_fp8_block.DECODE_TILE,
    {"BLOCK_N": 32, "num_stages": 6, "num_warps": 4},
    {"BLOCK_N": 128, "num_stages": 4, "num_warps": 4},
    {"BLOCK_N": 64, "num_stages": 4, "num_warps": 4},
)
_SOURCE = source_hash(Path(triton_fp8_block.__file__).read_text())


def tile_name(config: dict) -> str:
    """{"swapped": False, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4} -> "gemm-m16-n64-w4"; swapped:
    "swapped-n64-s6-w4"."""
    if config["swapped"]:
        return f"swapped-n{config['BLOCK_N']}-s{config['num_stages']}-w{config['num_warps']}"
    return f"gemm-m{config['BLOCK_M']}-n{config['BLOCK_N']}-w{config['num_warps']}"


def _run(x, weight, weight_scale, config: dict) -> torch.Tensor:
    tile = {key: value for key, value in config.items() if key != "swapped"}
    return triton_fp8_block.fp8_block_gemm(x, weight, weight_scale, None, swapped=config["swapped"], **tile)


class Fp8BlockGemmTuning:
    """autotune.tuner.OpTuning of triton_fp8_block.fp8_block_gemm; bucket {"n", "k", "rows"}."""

    op = OP

    def _configs(self, rows: int) -> list[dict]:
        heuristic = {"swapped": False, **triton_fp8_block.fp8_block_gemm_config(rows)}
        configs = [heuristic]
        for tile in GEMM_TILES:
            config = {"swapped": False, **tile}
            if tile["BLOCK_M"] <= max(16, rows) and config not in configs:  # no program of rows past the bucket's
                configs.append(config)
        if rows <= triton_fp8_block.DECODE_ROWS:
            configs += [{"swapped": True, **tile} for tile in SWAPPED_TILES]
        return configs

    def candidates(self, bucket: dict) -> list[Candidate]:
        return [
            Candidate(tile_name(c), functools.partial(_run, config=c), _SOURCE, c)
            for c in self._configs(bucket["rows"])
        ]

    def heuristic(self, bucket: dict) -> str:
        return tile_name(self._configs(bucket["rows"])[0])

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        n, k, rows = bucket["n"], bucket["k"], bucket["rows"]
        device = torch.device("cuda", torch.cuda.current_device())
        sets = []
        for _ in range(input_copies(n * k)):
            weight8, weight_scale = fp8_block.quantize_weight_blocks(torch.randn(n, k, device=device, dtype=dtype))
            sets.append((torch.randn(rows, k, device=device, dtype=dtype), weight8, weight_scale))
        return sets

    def reference(self, x, weight, weight_scale) -> torch.Tensor:
        return fp8_block.fp8_block_linear_reference(x, weight, weight_scale, None)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return 2.0**-7, 2.0**-7  # one rounding of the output; within a group the sums differ only in order

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        """A bucket per weight shape of the graph's `triton` block-scaled FP8 linears and per row bucket."""
        shapes = set()
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is _FP8_BLOCK_LINEAR and node.args[-1] == "triton":
                shapes.add(tuple(graph_value(gm, node.args[1]).shape))
        return [{"n": n, "k": k, "rows": rows} for n, k in sorted(shapes) for rows in triton_fp8_block.ROW_BUCKETS]

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        key = (device_index(device), bucket["n"], bucket["k"], bucket["rows"])
        triton_fp8_block.TUNED_BLOCK_TILES[key] = dict(candidate.config)


_FP8_BLOCK_LINEAR = torch.ops.compiled_llm.fp8_block_linear.default

register(Fp8BlockGemmTuning())
