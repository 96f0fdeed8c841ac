"""Decode attention per layer, by backend: µs per paged_attention call (KV write included), replayed as a
CUDA graph of 32 calls (one per layer of a Llama-3.1-8B step), for a few batch sizes and context lengths.

    python benchmarks/attention_decode.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import custom_ops  # noqa: F401
from custom_ops import LayerAttentionFeatures, StepAttentionMetadata, planned_step
from custom_ops.attention import flashinfer as flashinfer_backend
from custom_ops.attention import triton as triton_backend
from graph_timing import time_graph  # benchmarks/ (the script's own directory)

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 32, 8, 128, 16, 32


def time_backend(backend: str, batch: int, context: int, tensor_cores: bool = True,
                 cache_dtype: torch.dtype = torch.bfloat16) -> float:  # fmt: skip
    torch.manual_seed(0)
    width = math.ceil((context + 1) / BLOCK)
    cache = torch.randn(1 + batch * width, 2, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cache = cache.to(cache_dtype)
    table = (1 + torch.arange(batch * width, dtype=torch.int32)).view(batch, width)
    seq_lens = torch.full((batch,), context + 1, dtype=torch.int32)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    slots = (table[:, context // BLOCK].long() * BLOCK + context % BLOCK).cuda()
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    device_args = [table.cuda(), query_start_loc.cuda(), seq_lens.cuda()]
    planners = {}
    features = LayerAttentionFeatures(HEAD_DIM, HEADS, KV_HEADS, HEAD_DIM**-0.5, 0, 0.0, False, torch.bfloat16,
                                      cache_dtype)  # fmt: skip
    if backend == "xqa":
        from custom_ops.attention.xqa import XqaPlanner

        planners["xqa"] = XqaPlanner({i: features for i in range(LAYERS)}, BLOCK, torch.device("cuda"))
    if backend == "flashinfer":
        flashinfer_backend.TENSOR_CORE_MIN_GROUP = 4 if tensor_cores else 1 << 30
        planner = flashinfer_backend.FlashInferPlanner({i: features for i in range(LAYERS)}, BLOCK,
                                                       torch.device("cuda"))  # fmt: skip
        metadata = StepAttentionMetadata(table, query_start_loc, seq_lens, BLOCK, width, True)
        planner.plan(metadata, cuda_graph_key=batch)
        planners["flashinfer"] = planner

    def step():
        for layer in range(LAYERS):
            torch.ops.compiled_llm.paged_attention(q, k, v, cache, slots, *device_args, layer, HEAD_DIM**-0.5, 0,
                                                   0.0, None, backend)  # fmt: skip

    with planned_step(planners):
        per_layer = time_graph(step, LAYERS)
    flashinfer_backend.TENSOR_CORE_MIN_GROUP = 4
    return per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--contexts", default="256,2048", help="comma-separated context lengths")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"), help="the paged cache's dtype")
    parser.add_argument("--triton-tiles", metavar="TILE:WARPS:STAGES[:one-launch],...",
                        help="time the triton backend's decode kernel at each launch (keys a loop step, num_warps, "
                             "num_stages, and ':one-launch' for the step in the attention kernel alone; "
                             "triton.DECODE_LAUNCH), e.g. 32:4:3,32:4:3:one-launch,64:8:2")
    parser.add_argument("--xqa", action="store_true", help="also time the xqa backend (FlashInfer's XQA kernel)")
    parser.add_argument("--skip-flashinfer-cuda-cores", action="store_true",
                        help="leave out FlashInfer's CUDA-core decode (its fp8-cache kernels are not in the prebuilt kit)")
    args = parser.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    variants = {"flashinfer (tensor cores)": ("flashinfer", True), "flashinfer (CUDA cores)": ("flashinfer", False),
                "triton": ("triton", True)}  # fmt: skip
    if args.skip_flashinfer_cuda_cores:
        del variants["flashinfer (CUDA cores)"]
    if args.xqa:
        variants["xqa"] = ("xqa", True)
    launches = {}
    for spec in (args.triton_tiles or "").split(","):
        if spec:
            tile, warps, stages, *one = spec.split(":")
            if one not in ([], ["one-launch"]):
                parser.error(f"--triton-tiles: {spec!r} is not TILE:WARPS:STAGES[:one-launch]")
            variants[f"triton {spec}"] = ("triton", True)
            launches[f"triton {spec}"] = {"TILE": int(tile), "num_warps": int(warps), "num_stages": int(stages),
                                          "ONE_LAUNCH": bool(one)}  # fmt: skip
    rows = []
    print(f"{'batch':>5} {'context':>7} " + " ".join(f"{name:>26}" for name in variants))
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            times = {}
            for name, (backend, tensor_cores) in variants.items():
                triton_backend.DECODE_LAUNCH = launches.get(name, {"TILE": triton_backend.KEY_TILE})
                times[name] = time_backend(backend, batch, context, tensor_cores, cache_dtype)
            rows.append(dict(batch=batch, context=context, us_per_layer=times))
            print(f"{batch:>5} {context:>7} " + " ".join(f"{t:>26.2f}" for t in times.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "kv_cache_dtype": args.kv_cache_dtype, "rows": rows}, f,
                      indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
