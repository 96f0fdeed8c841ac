"""nvfp4_linear's kernels as autotuner candidates (autotune.tuner.OpTuning): the one-row GEMV's launch per weight shape,
and the tensor-core GEMM's tile per weight shape and decode row bucket (16, 64), for the graph's `nvfp4_linear` calls
whose backend is `triton`.

The fallback of each is the launch that runs untuned: for up to 16 rows of bfloat16 or float16, the tensor-core
decode's (gluon_int4.mma_default), else triton_nvfp4.gemv_config's / gemm_config's. The others are the Triton
kernels' own launch ({"MMA": False}) and variations of the channels a program, the scale blocks a step, the K tile,
warps and stages, and the tensor-core decode's (int4's MMA tiles). A winner is installed in
triton_nvfp4.TUNED_GEMV / TUNED_GEMM, which every later call of that shape on that device reads, CUDA-graph captures
included.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autotune.kernel_cache import source_hash
from autotune.select import device_index, graph_value, register
from autotune.tuner import Candidate, input_copies
from custom_ops.linear import gluon_int4, nvfp4, triton_nvfp4
from custom_ops.linear.int4_tuning import (
    ONE_ROW_MMA_TILES,
    TRITON_DEFAULT,
    FourBitKernelTuning,
    gemm_tiles_for,
    smooth_rows,
)

NVFP4_LINEAR = torch.ops.compiled_llm.nvfp4_linear.default
GEMV_TILES = (  # beside gemv_config's own; the leaders of an H200 sweep over Llama-8B's shapes
    TRITON_DEFAULT,
    {"GROUPS_A_STEP": 32, "num_warps": 8},
    {"GROUPS_A_STEP": 64, "num_warps": 4},
    {"GROUPS_A_STEP": 32, "num_warps": 4},
    {"BLOCK_N": 16, "GROUPS_A_STEP": 64, "num_warps": 8},
    {"STAGES": 3},  # the K loop's loads pipelined 3 steps ahead (not yet timed)
)
GEMM_TILES = (
    {"BLOCK_N": 128},
    {"BLOCK_N": 32},
    {"BLOCK_K": 64},
    {"num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 8},
)
# The kernels, their launchers and the numerics: a change to any is a changed candidate.
_SOURCE = source_hash(*(Path(module.__file__).read_text() for module in (triton_nvfp4, nvfp4, gluon_int4)),
                      *((Path(triton_nvfp4.__file__).parent / name).read_text()
                        for name in ("triton_int4_kernels.py", "gluon_int4_kernels.py", "gluon_int4_decode.py")))  # fmt: skip


def _shapes(gm: torch.fx.GraphModule) -> list[tuple[int, int]]:
    """(N, K) of each `triton` nvfp4_linear of the graph."""
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is NVFP4_LINEAR and node.args[-1] == "triton":
            n, half = graph_value(gm, node.args[1]).shape
            found.add((n, 2 * half))
    return sorted(found)


class _Nvfp4KernelTuning(FourBitKernelTuning):
    """nvfp4_linear's: held to the reference on random weights quantized by nvfp4.quantize_weight (x, codes, scales,
    global scales, smooth)."""

    source = _SOURCE

    def call(self, inputs: tuple, tile: dict) -> torch.Tensor:
        x, weight, scales, global_scale, smooth = inputs
        return self.launch(x, weight, scales, global_scale, smooth, smooth_rows(weight, smooth), None, **tile)

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        """Weights with AWQ's smooth, as the pass quantizes them."""
        n, k = bucket["n"], bucket["k"]
        device = torch.device("cuda", torch.cuda.current_device())
        sets = []
        for _ in range(input_copies(n * k // 2)):
            smooth = torch.rand(1, k, device=device) + 0.5
            weight = nvfp4.quantize_weight(torch.randn(n, k, device=device) / k**0.5, smooth[0])
            sets.append((torch.randn(bucket.get("rows", 1), k, device=device, dtype=dtype), *weight, smooth))
        return sets

    def reference(self, x, weight, scales, global_scale, smooth) -> torch.Tensor:
        return nvfp4.nvfp4_linear_reference(x, weight, scales, global_scale, smooth, smooth_rows(weight, smooth), None)


class Nvfp4GemvTuning(_Nvfp4KernelTuning):
    """The one-row GEMV's launch; bucket {"n", "k"}."""

    op, kind, tiles = "nvfp4_gemv", "gemv", GEMV_TILES + ONE_ROW_MMA_TILES

    def launch(self, *args, **tile) -> torch.Tensor:
        return triton_nvfp4.nvfp4_gemv(*args, **tile)

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        return [{"n": n, "k": k} for n, k in _shapes(gm)]

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        triton_nvfp4.TUNED_GEMV[(device_index(device), bucket["n"], bucket["k"])] = dict(candidate.config)


class Nvfp4GemmTuning(_Nvfp4KernelTuning):
    """The tensor-core GEMM's tile for decode batches; bucket {"n", "k", "rows"}."""

    op, kind, tiles = "nvfp4_gemm", "gemm", GEMM_TILES

    def launch(self, *args, **tile) -> torch.Tensor:
        return triton_nvfp4.nvfp4_gemm(*args, **tile)

    def tiles_for(self, bucket: dict) -> tuple[dict, ...]:
        return gemm_tiles_for(self.tiles, bucket)

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        return [{"n": n, "k": k, "rows": rows} for n, k in _shapes(gm) for rows in triton_nvfp4.GEMM_ROW_BUCKETS]

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        key = (device_index(device), bucket["n"], bucket["k"], bucket["rows"])
        triton_nvfp4.TUNED_GEMM[key] = dict(candidate.config)


register(Nvfp4GemvTuning())
register(Nvfp4GemmTuning())
