"""The axes the autotuner times Triton's decode kernel along, beside its heuristic's (triton.decode_splits,
triton.default_decode_launch): more key splits, and other launches (keys a loop step, warps, stages, the one-launch
merge). One axis at a time, the other at the heuristic's, so a bucket times a handful of Triton candidates, not their
product; a winner goes to triton.TUNED_DECODE_SPLITS or triton.TUNED_DECODE_LAUNCHES (tuning.py installs it)."""

from __future__ import annotations

import torch

from custom_ops.attention import triton as triton_backend

SPLITS = (1, 2, 4, 8, 16)  # key splits of Triton's decode kernel tried beside its heuristic's (triton.decode_splits)
# Launches of Triton's decode kernel (keys a step, warps, stages) tried beside the default (triton.default_decode_launch),
# each at the heuristic's splits: 64 keys led at 64 rows over a bf16 cache (1.09-1.30x), 2 stages over an fp8 one,
# 2 warps over an fp8 cache at 256-512 rows (3-8% on an H100; BENCHMARKS.md); the others are their neighbours.
LAUNCHES = (
    {"TILE": 64, "num_warps": 4, "num_stages": 3},
    {"TILE": 64, "num_warps": 4, "num_stages": 2},
    {"TILE": 32, "num_warps": 4, "num_stages": 2},
    {"TILE": 32, "num_warps": 4, "num_stages": 3},
    {"TILE": 32, "num_warps": 2, "num_stages": 2},
    # One warp a program: p stays in registers (no shared-memory exchange and barrier between the two MMAs) and no
    # row work is repeated by 4 warps; sm_90a's loop takes 42 warp-instructions a key over an fp8 cache against the
    # default's 57, 30 over a bf16 one against 50 (benchmarks/kernel_sass.py). The default from
    # triton.ONE_WARP_PROGRAMS_PER_SM programs an SM; below, behind 4 warps at 64 rows over an fp8 cache on an H100.
    {"TILE": 32, "num_warps": 1, "num_stages": 2},
    # The step in one launch: the splits merged by the kernel's last program of a row, or at one split the KV write in
    # the kernel (triton.py's docstring)
    {"TILE": 32, "num_warps": 4, "num_stages": 3, "ONE_LAUNCH": True},
    {"TILE": 64, "num_warps": 4, "num_stages": 3, "ONE_LAUNCH": True},
    {"TILE": 32, "num_warps": 4, "num_stages": 2, "ONE_LAUNCH": True},
)


def decode_launches(bucket: dict, splits: int, device: torch.device) -> list[dict]:
    """LAUNCHES but the default's at `splits` on `device`, for a decode bucket whose head takes a decode launch (not
    a wide head's)."""
    if triton_backend.wide_head(bucket["head_dim"]):
        return []
    one_warp = triton_backend.decode_one_warp(bucket["batch"], bucket["heads"], bucket["kv_heads"], bucket["head_dim"],
                                              splits, device)  # fmt: skip
    default = triton_backend.default_decode_launch(getattr(torch, bucket["kv_cache"]), splits, one_warp)
    return [launch for launch in LAUNCHES if ({"ONE_LAUNCH": False} | launch) != default]


def launch_name(launch: dict) -> str:
    """{"TILE": 64, "num_warps": 4, "num_stages": 3} -> "triton-keys64-warps4-stages3" ("...-one-launch" with
    ONE_LAUNCH)."""
    one = "-one-launch" if launch.get("ONE_LAUNCH") else ""
    return f"triton-keys{launch['TILE']}-warps{launch['num_warps']}-stages{launch['num_stages']}{one}"


def variants(bucket: dict, heuristic_splits: int, device: torch.device) -> list[tuple[str, dict]]:
    """(candidate name, config) of each variant of a decode bucket: {"splits": n} for SPLITS above the heuristic's
    (a count tuned at TUNING_CONTEXT keys also runs far longer contexts, where fewer programs than the heuristic's two
    waves would leave the GPU idle), {"launch": launch} for decode_launches at the heuristic's splits."""
    found = [(f"triton-splits{n}", {"splits": n}) for n in SPLITS if n > heuristic_splits]
    return found + [
        (launch_name(launch), {"launch": launch}) for launch in decode_launches(bucket, heuristic_splits, device)
    ]
