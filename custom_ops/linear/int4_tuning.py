"""int4_linear's kernels as autotuner candidates (autotune.tuner.OpTuning): the one-row GEMV's launch per weight shape,
and the tensor-core GEMM's tile per weight shape and decode row bucket (16, 64), for the graph's `int4_linear` calls
whose backend is `triton`.

The fallback of each is the launch that runs untuned: for up to 16 rows of bfloat16 or float16, the tensor-core
decode's (gluon_int4.mma_default), else triton_int4.gemv_config's / gemm_config's. The others are the Triton kernels'
own launch ({"MMA": False}) and variations of the channels a program, the groups a step, warps and stages, and the
tensor-core decode's. A winner is installed in triton_int4.TUNED_GEMV / TUNED_GEMM,
which every later call of that shape on that device reads, CUDA-graph captures included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from autotune.kernel_cache import source_hash
from autotune.select import device_index, graph_value, register
from autotune.tuner import Candidate, input_copies
from custom_ops.linear import gluon_int4, int4, triton_int4

INT4_LINEAR = torch.ops.compiled_llm.int4_linear.default
TRITON_DEFAULT = {"MMA": False}  # gemv_config's / gemm_config's launch where the fallback is the tensor-core decode's
GEMV_TILES = (  # beside gemv_config's own; the leaders of an H200 sweep over Llama-8B's shapes
    TRITON_DEFAULT,
    {"GROUPS_A_STEP": 8, "num_warps": 4},
    {"GROUPS_A_STEP": 4, "num_warps": 8},
    {"GROUPS_A_STEP": 2, "num_warps": 4},
    {"BLOCK_N": 8, "GROUPS_A_STEP": 8, "num_warps": 8},
    {"BLOCK_N": 32, "GROUPS_A_STEP": 4, "num_warps": 8},
    {"PTX_DECODE": True},  # the codes decoded in inline PTX (triton_int4_kernels.add_pair_products_ptx)
    {"PTX_DECODE": True, "BLOCK_N": 32},
    {"STAGES": 3},  # the K loop's loads pipelined 3 steps ahead (with PTX, groups of 32's default for a long K)
    {"PTX_DECODE": True, "STAGES": 3},
    # bfloat16 x read as pairs (dropped where a smooth multiplies x first): ~0.5 instruction a weight less in Q4_K's
    # loop (benchmarks/kernel_sass.py int4-gemv)
    {"PTX_DECODE": True, "BF16_PAIRS": True},
    {"PTX_DECODE": True, "STAGES": 3, "BF16_PAIRS": True},
)
# gluon_int4.py's tensor-core decode (up to 16 rows): channels a program (ROWS), warps splitting K (SPLIT), groups a
# loop iteration (UNROLL); ~2.5 instructions a weight against the GEMV's ~6 (benchmarks/kernel_sass.py int4-mma).
MMA_TILES = (
    {"MMA": True},
    {"MMA": True, "SPLIT": 8},
    {"MMA": True, "ROWS": 32},
    {"MMA": True, "ROWS": 32, "SPLIT": 8},
    {"MMA": True, "ROWS": 64, "SPLIT": 8},
    {"MMA": True, "UNROLL": 4},
    # the codes bulk-prefetched into L2 before the wait for the previous kernel (PDL): the small linears' latency
    {"MMA": True, "SPLIT": 8, "PREFETCH": True},
    {"MMA": True, "ROWS": 32, "SPLIT": 8, "PREFETCH": True},
    {"MMA": True, "ROWS": 32, "PREFETCH": True},
)
# One row's first 4 steps of codes loaded into registers before the wait for the previous kernel: one row's tiles
# only (mma_launch ignores PRELOAD above one row, where they would be MMA_TILES' launches timed twice).
PRELOAD_TILES = (
    {"MMA": True, "PRELOAD": 4},
    {"MMA": True, "SPLIT": 8, "PRELOAD": 4},
    {"MMA": True, "ROWS": 32, "PRELOAD": 4},
    {"MMA": True, "ROWS": 32, "SPLIT": 8, "PRELOAD": 4},
)
# one row unrolls every step of the tensor-core decode (UNROLL matters only past 32 steps a warp or a 96 KB row)
ONE_ROW_MMA_TILES = (*(tile for tile in MMA_TILES if "UNROLL" not in tile), *PRELOAD_TILES)
GEMM_TILES = (
    {"BLOCK_N": 128},
    {"BLOCK_N": 32},
    {"num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 8},
    # even and odd columns as two dots, decoded without int-to-float (triton_int4_kernels.nibbles_minus_zero): 10.2
    # instructions a weight at a 16-row tile against 11.8 (benchmarks/kernel_sass.py 4bit-gemm), not yet timed
    {"SPLIT_NIBBLES": True},
    {"SPLIT_NIBBLES": True, "BLOCK_N": 128},
)
# The kernels, their launchers and the numerics: a change to any is a changed candidate.
_SOURCE = source_hash(*(Path(module.__file__).read_text() for module in (triton_int4, int4, gluon_int4)),
                      *((Path(triton_int4.__file__).parent / name).read_text()
                        for name in ("triton_int4_kernels.py", "gluon_int4_kernels.py", "gluon_int4_decode.py")))  # fmt: skip


def gemm_tiles_for(tiles: tuple[dict, ...], bucket: dict) -> tuple[dict, ...]:
    """A 4-bit GEMM's candidates beside the fallback: up to 16 rows, where the fallback is the tensor-core decode's,
    the Triton GEMM's own launch and the decode's other tiles too."""
    if bucket.get("rows", 0) <= gluon_int4.MAX_ROWS:
        return (TRITON_DEFAULT, *tiles, *MMA_TILES)
    return tiles


def tile_name(kind: str, tile: dict) -> str:
    """("gemv", {"BLOCK_N": 32, "num_warps": 8}) -> "gemv-n32-warps8", {"PTX_DECODE": True} -> "gemv-ptx", a tensor-core
    decode's "mma-..."; the fallback is the bare kind."""
    if tile == TRITON_DEFAULT:
        return f"{kind}-triton"
    if tile.get("MMA"):  # {"MMA": True, "ROWS": 32} -> "mma-rows32"
        return "-".join(["mma", *(f"{key.lower()}{'' if value is True else value}" for key, value in tile.items()
                                  if key != "MMA")])  # fmt: skip
    short = {"BLOCK_N": "n", "GROUPS_A_STEP": "g", "BLOCK_K": "k", "PTX_DECODE": "ptx", "SPLIT_NIBBLES": "split",
             "STAGES": "stages", "BF16_PAIRS": "pairs"}  # fmt: skip
    parts = [
        f"{short.get(key, key.removeprefix('num_'))}{'' if value is True else value}" for key, value in tile.items()
    ]
    return "-".join([kind, *parts])


def _inputs(n: int, k: int, group_size: int, offsets: bool, rows: int, dtype: torch.dtype) -> list[tuple]:
    """Input sets in the form the graph's calls take: zero points with AWQ's smooth, or float16 offsets without (a
    GGUF file's; int4_awq's own also carry a smooth, a multiply of x that every candidate pays alike)."""
    device = torch.device("cuda", torch.cuda.current_device())
    sets = []
    for _ in range(input_copies(n * k // 2)):
        x = torch.randn(rows, k, device=device, dtype=dtype)
        if offsets:
            codes = torch.randint(0, 16, (n, k), device=device, dtype=torch.uint8)
            scales = (torch.rand(n, k // group_size, device=device) * 0.02).half()
            sets.append((x, int4.pack_codes(codes), scales, -8 * scales, None, group_size))
            continue
        weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        smooth = torch.rand(1, k, device=device) + 0.5
        sets.append((x, *int4.quantize_weight(weight, group_size, smooth[0]), smooth, group_size))
    return sets


def smooth_rows(weight, smooth) -> list[int]:
    """The smooth_rows of an input set's one-part smooth (or none)."""
    return [] if smooth is None else [weight.shape[0]]


def _shapes(gm: torch.fx.GraphModule) -> list[tuple[int, int, int, bool]]:
    """(N, K, group size, offsets) of each `triton` int4_linear of the graph."""
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is INT4_LINEAR and node.args[-1] == "triton":
            n, half = graph_value(gm, node.args[1]).shape
            offsets = graph_value(gm, node.args[3]).is_floating_point()
            found.add((n, 2 * half, node.args[-2], offsets))
    return sorted(found)


class FourBitKernelTuning:
    """What the 4-bit formats' GEMV and GEMM tunings share (int4 here, NVFP4 in nvfp4_tuning.py): candidates are
    `launch` with each of `tiles` (the untuned launch first), called by `call` on an input set; `source` hashes the
    kernels, launchers and numerics."""

    op: str
    kind: str
    tiles: tuple[dict, ...]
    source: str

    def launch(self, *args, **tile) -> torch.Tensor:
        raise NotImplementedError

    def call(self, inputs: tuple, tile: dict) -> torch.Tensor:
        raise NotImplementedError

    def candidates(self, bucket: dict) -> list[Candidate]:
        def run(*inputs, tile):
            return self.call(inputs, tile)

        return [
            Candidate(
                tile_name(self.kind, t),
                functools.partial(run, tile=t),
                self.source,
                t,
                dtypes=gluon_int4.MMA_DTYPES if t.get("MMA") else None,  # the tensor-core decode writes 16-bit floats
            )
            for t in ({}, *self.tiles_for(bucket))
        ]

    def tiles_for(self, bucket: dict) -> tuple[dict, ...]:
        return self.tiles

    def heuristic(self, bucket: dict) -> str:
        return self.kind

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return 2.0**-7, 2.0**-7  # one rounding of the output, and summation order


class _Int4KernelTuning(FourBitKernelTuning):
    """int4_linear's: held to the reference on inputs in the graph's form of zeros (x, qweight, scales, zeros, smooth,
    group size)."""

    source = _SOURCE

    def call(self, inputs: tuple, tile: dict) -> torch.Tensor:
        x, qweight, scales, zeros, smooth, group_size = inputs
        return self.launch(x, qweight, scales, zeros, smooth, smooth_rows(qweight, smooth), None, group_size, **tile)

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        return _inputs(bucket["n"], bucket["k"], bucket["group_size"], bucket["offsets"], bucket.get("rows", 1), dtype)

    def reference(self, x, qweight, scales, zeros, smooth, group_size: int) -> torch.Tensor:
        rows = smooth_rows(qweight, smooth)
        return int4.int4_linear_reference(x, qweight, scales, zeros, smooth, rows, None, group_size)


class Int4GemvTuning(_Int4KernelTuning):
    """The one-row GEMV's launch; bucket {"n", "k", "group_size", "offsets"}."""

    op, kind, tiles = "int4_gemv", "gemv", GEMV_TILES + ONE_ROW_MMA_TILES

    def launch(self, *args, **tile) -> torch.Tensor:
        return triton_int4.int4_gemv(*args, **tile)

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        return [{"n": n, "k": k, "group_size": g, "offsets": o} for n, k, g, o in _shapes(gm)]

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        key = (device_index(device), bucket["n"], bucket["k"], bucket["group_size"], bucket["offsets"])
        triton_int4.TUNED_GEMV[key] = dict(candidate.config)


class Int4GemmTuning(_Int4KernelTuning):
    """The tensor-core GEMM's tile for decode batches; bucket {"n", "k", "group_size", "offsets", "rows"}."""

    op, kind, tiles = "int4_gemm", "gemm", GEMM_TILES

    def launch(self, *args, **tile) -> torch.Tensor:
        return triton_int4.int4_gemm(*args, **tile)

    def tiles_for(self, bucket: dict) -> tuple[dict, ...]:
        return gemm_tiles_for(self.tiles, bucket)

    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        return [{"n": n, "k": k, "group_size": g, "offsets": o, "rows": rows} for n, k, g, o in _shapes(gm)
                for rows in triton_int4.GEMM_ROW_BUCKETS]  # fmt: skip

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        key = (device_index(device), bucket["n"], bucket["k"], bucket["group_size"], bucket["offsets"], bucket["rows"])
        triton_int4.TUNED_GEMM[key] = dict(candidate.config)


register(Int4GemvTuning())
register(Int4GemmTuning())
