"""The one-row linear's candidates for the autotuner (autotune.tuner.OpTuning): cuBLAS or the Triton GEMV, and the
GEMV's tile, per weight shape [N, K] of the graph's `compiled_llm::linear` and `linear_silu_mul` calls whose
backend is `triton` (the calls of batch-1 decode).

cuBLAS is the fallback (it takes every shape); the heuristic is what runs untuned (op.gemv_is_faster, then
triton_gemv.gemv_config's tile). A winner is installed in op.TUNED_GEMV, which every later one-row call of that
shape on that device reads, CUDA-graph captures included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from autotune.kernel_cache import source_hash
from autotune.select import device_index, graph_value, register
from autotune.tuner import Candidate, input_copies
from custom_ops.linear import op, triton_gemv

OP = "linear_one_row"
CUBLAS = "cublas"
TILES = (  # beside gemv_config's own: narrower and wider loads, more rows a program, more warps
    {"BLOCK_N": 1, "BLOCK_K": 4096},
    {"BLOCK_N": 2, "BLOCK_K": 2048},
    {"BLOCK_N": 4, "BLOCK_K": 1024},
    {"BLOCK_N": 8, "BLOCK_K": 1024},  # K = 2,880 (GPT-OSS): 3 steps 94% full, where a whole row's 4,096 are 70%
    {"BLOCK_N": 8, "BLOCK_K": 512},
    {"num_warps": 8},
)
_GEMV_SOURCE = source_hash(
    *(Path(op.__file__).with_name(name).read_text() for name in ("triton_gemv.py", "triton_gemv_kernels.py", "op.py"))
)


def tile_name(tile: dict) -> str:
    return (
        "gemv-" + "-".join(f"{key.lower().replace('block_', '')}{value}" for key, value in tile.items())
        if tile
        else "gemv"
    )


def _gemv(x, weight, silu_mul: bool, tile: dict) -> torch.Tensor:  # inputs: (x [1, K], weight [N, K], silu_mul)
    return triton_gemv.launch_gemv(x, weight, None, None, silu_mul, **tile)


def cublas(x, weight, silu_mul: bool) -> torch.Tensor:
    """What the op runs where the GEMV does not (cuBLAS, then the activation's Triton kernel)."""
    return op.cublas_linear_silu_mul(x, weight, None) if silu_mul else F.linear(x, weight)


class OneRowLinearTuning:
    """autotune.tuner.OpTuning of the one-row linear; bucket {"n", "k", "silu_mul"}."""

    op = OP

    def candidates(self, bucket: dict) -> list[Candidate]:
        found = [Candidate(CUBLAS, cublas, f"torch{torch.__version__}")]
        for tile in ({}, *TILES):
            found.append(Candidate(tile_name(tile), functools.partial(_gemv, tile=tile), _GEMV_SOURCE, tile))
        return found

    def heuristic(self, bucket: dict) -> str:
        return tile_name({}) if op.gemv_is_faster(bucket["n"], bucket["k"]) else CUBLAS

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        n, k, rows = bucket["n"], bucket["k"], bucket.get("rows", 1)
        copies = input_copies(n * k * dtype.itemsize)
        device = torch.device("cuda", torch.cuda.current_device())
        return [(torch.randn(rows, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
                 / k**0.5, bucket["silu_mul"]) for _ in range(copies)]  # fmt: skip

    def reference(self, x, weight, silu_mul: bool) -> torch.Tensor:
        out = F.linear(x.float(), weight.float())  # float32 sums: a big LM head in float64 would be 4x its size
        return op.silu_and_mul(out) if silu_mul else out

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return 2.0**-6, 2.0**-6  # a few roundings of the output's dtype (and of SiLU's, as the model rounds it)

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        """A bucket per weight shape of the graph's `triton` linears, with or without the fused activation."""
        found = {(*graph_value(gm, weight).shape, silu_mul) for weight, silu_mul in op.triton_linears(gm.graph)}
        return [{"n": n, "k": k, "silu_mul": silu_mul} for n, k, silu_mul in sorted(found)]

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        tile = None if candidate.name == CUBLAS else dict(candidate.config)
        op.TUNED_GEMV[(device_index(device), bucket["n"], bucket["k"], bucket["silu_mul"])] = tile


register(OneRowLinearTuning())
