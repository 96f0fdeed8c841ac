"""The `xqa` paged-attention backend (FlashInfer's XQA kernel for decode steps, triton's for the rest) against the
reference op, on fresh random steps: bf16 and FP8 caches, block sizes XQA takes, sinks and sliding windows, a
mixed step, a CUDA-graph replay; on CPU, the layers it refuses and why."""

from __future__ import annotations

import random

import pytest
import torch

import custom_ops  # noqa: F401
from custom_ops import LayerAttentionFeatures, planned_step
from custom_ops.attention.xqa import layer_unsupported
from tests.paged_steps import check_decode_graph_replay, random_step

ops = torch.ops.compiled_llm
gpu = pytest.mark.gpu

LAYERS = {  # (heads, kv heads, head_dim, sliding window, sinks)
    "llama-8b": (32, 8, 128, 0, False),
    "smollm2": (9, 3, 64, 0, False),
    "gpt-oss": (16, 2, 64, 24, True),
}
STEPS = {
    "decode": [(1, 1), (16, 1), (17, 1), (200, 1), (33, 1), (700, 1)],
    "mixed": [(0, 37), (20, 1), (5, 16), (63, 1)],
    "tokens-as-sequences": [(5, 0), (16, 3), (40, 0)],  # not a decode step, though as many tokens as sequences
}


def _features(layer: str, dtype=torch.bfloat16, cache_dtype=torch.bfloat16, softcap=0.0, values_in_keys=False):
    heads, kv_heads, head_dim, window, sinks = LAYERS[layer]
    return LayerAttentionFeatures(head_dim, heads, kv_heads, head_dim**-0.5, window, softcap, sinks, dtype,
                                  cache_dtype, values_in_keys)  # fmt: skip


def test_the_layers_xqa_cannot_run_are_named():
    assert all(layer_unsupported(_features(layer)) is None for layer in LAYERS)
    reasons = {
        "soft-cap": layer_unsupported(_features("llama-8b", softcap=30.0)),
        "float32": layer_unsupported(_features("llama-8b", dtype=torch.float32, cache_dtype=torch.float32)),
        "latent": layer_unsupported(_features("llama-8b", values_in_keys=True)),
        "fp16 cache of a bf16 model": layer_unsupported(_features("llama-8b", cache_dtype=torch.float16)),
    }
    assert reasons == {
        "soft-cap": "a soft-cap on the logits",
        "float32": "dtype torch.float32 (needs bfloat16 or float16)",
        "latent": "values kept in the keys (a latent cache of one plane)",
        "fp16 cache of a bf16 model": "KV cache dtype torch.float16",
    }


def _check(layer: str, step: str, block_size: int, cache_dtype: torch.dtype) -> None:
    from custom_ops.attention.xqa import XqaPlanner

    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    heads, kv_heads, head_dim, window, has_sinks = LAYERS[layer]
    args, metadata = random_step(random.Random(seed), STEPS[step], block_size, heads, kv_heads, head_dim,
                                 torch.bfloat16, "cuda", cache_dtype)  # fmt: skip
    sinks = torch.randn(heads, device="cuda") if has_sinks else None
    extras = (0, head_dim**-0.5, window, 0.0, sinks)
    reference_cache = args[3].clone()
    expected = ops.paged_attention(*args[:3], reference_cache, *args[4:], *extras, "reference")
    planner = XqaPlanner({0: _features(layer, cache_dtype=cache_dtype)}, block_size, torch.device("cuda"))
    planner.plan(metadata)
    with planned_step({"xqa": planner}):
        actual = ops.paged_attention(*args, *extras, "xqa")
    torch.cuda.synchronize()
    assert torch.isfinite(actual).all(), f"seed {seed}"
    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error < 1e-2, f"seed {seed}: relative error {error:.2e}"
    written = ~torch.isnan(reference_cache.float())
    assert torch.equal(args[3][written].float(), reference_cache[written].float()), f"seed {seed}"


# Each (layer kind, block size, cache dtype) is a JIT build of XQA (a minute or more the first time): five of them.
CASES = [("llama-8b", 16, torch.bfloat16), ("llama-8b", 16, torch.float8_e4m3fn), ("llama-8b", 32, torch.bfloat16),
         ("gpt-oss", 16, torch.bfloat16), ("smollm2", 16, torch.float8_e4m3fn)]  # fmt: skip


@gpu
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize(("layer", "block_size", "cache_dtype"), CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_xqa_matches_reference_on_gpu(layer, step, block_size, cache_dtype):
    """Decode steps run XQA's generic kernel (keys and values converted to bf16, as the reference reads them); the
    mixed step runs triton's. Unused cache slots hold NaN: a kernel that multiplies them by a zero weight fails."""
    _check(layer, step, block_size, cache_dtype)


@gpu
def test_xqa_decode_replays_in_a_cuda_graph():
    """No planning: one captured decode graph serves steps of other lengths and block tables."""
    from custom_ops.attention.xqa import XqaPlanner

    planner = XqaPlanner({0: _features("llama-8b")}, 16, torch.device("cuda"))
    check_decode_graph_replay("xqa", {"xqa": planner}, max_context=600)
