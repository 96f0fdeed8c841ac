"""GPU attention backends against the reference op, on random mixed batches and random block tables."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from conftest import relative_error

import custom_ops  # noqa: F401
from custom_ops import LayerAttentionFeatures, planned_step
from tests.paged_steps import random_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="flashinfer is not installed"),
]
ops = torch.ops.compiled_llm


def seeded_layer(shape: str, cache_dtype: torch.dtype = torch.bfloat16) -> tuple[int, random.Random, LayerAttentionFeatures]:
    """A fresh seed (reported on failure), its generators, and a bf16 layer of `shape` without extras."""
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    num_heads, num_kv_heads, head_dim = SHAPES[shape]
    features = LayerAttentionFeatures(head_dim, num_heads, num_kv_heads, head_dim**-0.5, 0, 0.0, False, torch.bfloat16,
                                      cache_dtype)  # fmt: skip
    return seed, random.Random(seed), features


SHAPES = {
    "llama-8b": (32, 8, 128),  # tensor-core decode (4 query heads per KV head)
    "smollm2": (9, 3, 64),  # CUDA-core decode
}
STEPS = {
    "mixed": [(0, 37), (20, 1), (5, 16), (63, 1), (0, 1), (100, 30)],
    "decode": [(1, 1), (16, 1), (17, 1), (200, 1), (33, 1)],
}


def check_flashinfer(shape: str, step: str, block_size: int, cache_dtype: torch.dtype) -> None:
    from custom_ops.attention.flashinfer import FlashInferPlanner

    seed, rng, features = seeded_layer(shape, cache_dtype)
    num_heads, num_kv_heads, head_dim, scale = (features.num_q_heads, features.num_kv_heads, features.head_dim,
                                                features.scale)  # fmt: skip
    args, metadata = random_step(rng, STEPS[step], block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16,
                                 cache_dtype=cache_dtype)  # fmt: skip
    reference_cache = args[3].clone()
    expected = ops.paged_attention(*args[:3], reference_cache, *args[4:], 0, scale, 0, 0.0, None, "reference")
    planner = FlashInferPlanner({0: features}, block_size, torch.device("cuda"))
    planner.plan(metadata)
    with planned_step({"flashinfer": planner}):
        actual = ops.paged_attention(*args, 0, scale, 0, 0.0, None, "flashinfer")
    torch.cuda.synchronize()
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) < 1e-2, f"seed {seed}"
    written = ~torch.isnan(reference_cache.float())
    assert torch.equal(args[3][written].float(), reference_cache[written].float())  # both wrote the same slots


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_flashinfer_matches_reference(shape, step, block_size):
    check_flashinfer(shape, step, block_size, torch.bfloat16)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_flashinfer_fp8_cache_matches_reference(step):
    """fp8 keys/values read by FlashInfer against the reference reading the same fp8 cache (the rounding
    itself is bounded in test_attention_ops). The fp8 prefill variant is compiled on first use (minutes)."""
    check_flashinfer("llama-8b", step, 16, torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_flashinfer_decode_replays_in_a_cuda_graph(shape):
    """Plan into a graph-mode wrapper, capture once, then replay with other lengths and block tables."""
    from custom_ops.attention.flashinfer import FlashInferPlanner

    seed, rng, features = seeded_layer(shape)
    num_heads, num_kv_heads, head_dim, scale = (features.num_q_heads, features.num_kv_heads, features.head_dim,
                                                features.scale)  # fmt: skip
    planner = FlashInferPlanner({0: features}, 16, torch.device("cuda"))
    batch, width = 4, 16
    steps = [[(rng.randrange(0, 200), 1) for _ in range(batch)] for _ in range(3)]
    built = [random_step(rng, s, 16, num_heads, num_kv_heads, head_dim, torch.bfloat16) for s in steps]
    static = [a.clone() for a in built[0][0][:3]]  # q, k, v
    cache = torch.zeros_like(max((b[0][3] for b in built), key=lambda c: c.shape[0]))
    slots = torch.zeros(batch, dtype=torch.int64, device="cuda")
    out = torch.empty_like(static[0])

    def load(args, metadata):
        for dst, src in zip(static, args[:3]):
            dst.copy_(src)
        cache.zero_()
        cache[: args[3].shape[0]].copy_(args[3].nan_to_num(0.0))
        slots.copy_(args[4])
        planner.plan(metadata, cuda_graph_key=batch)

    load(*built[0])
    table = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    with planned_step({"flashinfer": planner}):
        run = lambda: out.copy_(ops.paged_attention(*static, cache, slots, table, table[:, 0], table[:, 0], 0, scale,
                                                    0, 0.0, None, "flashinfer"))  # fmt: skip
        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
    for args, metadata in built[1:]:
        load(args, metadata)
        graph.replay()
        expected_cache = args[3].nan_to_num(0.0)
        expected = ops.paged_attention(*args[:3], expected_cache, *args[4:], 0, scale, 0, 0.0, None, "reference")
        torch.cuda.synchronize()
        assert relative_error(out, expected) < 1e-2, f"seed {seed}"


@pytest.mark.parametrize("step", sorted(STEPS))
def test_flashinfer_sliding_window_and_softcap_match_reference(step):
    """Gemma-2-like layers: a window shorter than most sequences, and logit soft-capping. These kernel
    variants are not in the device kit's prebuilt cache: the first run compiles them (minutes)."""
    from custom_ops.attention.flashinfer import FlashInferPlanner

    seed, rng, plain = seeded_layer("llama-8b")
    features = LayerAttentionFeatures(plain.head_dim, plain.num_q_heads, plain.num_kv_heads, plain.scale,
                                      24, 30.0, False, torch.bfloat16, torch.bfloat16)  # fmt: skip
    args, metadata = random_step(rng, STEPS[step], 16, plain.num_q_heads, plain.num_kv_heads, plain.head_dim,
                                 torch.bfloat16)  # fmt: skip
    reference_cache = args[3].clone()
    extras = (0, features.scale, features.sliding_window, features.softcap, None)
    expected = ops.paged_attention(*args[:3], reference_cache, *args[4:], *extras, "reference")
    planner = FlashInferPlanner({0: features}, 16, torch.device("cuda"))
    planner.plan(metadata)
    with planned_step({"flashinfer": planner}):
        actual = ops.paged_attention(*args, *extras, "flashinfer")
    torch.cuda.synchronize()
    assert relative_error(actual, expected) < 1e-2, f"seed {seed}"
