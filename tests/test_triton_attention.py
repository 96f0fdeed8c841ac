"""The Triton paged-attention backend against the reference op: on the GPU in bf16, and in Triton's
interpreter on CPU in float32 (so CI without a GPU still runs the kernel's logic)."""

from __future__ import annotations

import random

import pytest
import torch

import custom_ops  # noqa: F401
from custom_ops.triton_runtime import triton_available
from tests.paged_steps import check_decode_graph_replay, random_step

ops = torch.ops.compiled_llm
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

STEPS = {
    "mixed": [(0, 37), (20, 1), (5, 16), (63, 1), (0, 1), (100, 30)],
    "decode": [(1, 1), (16, 1), (17, 1), (200, 1), (33, 1)],
    "one-long-prefill": [(40, 90)],
    "short-mixed": [(3, 4), (20, 1), (0, 3)],
    # as many tokens as sequences, but not one each (sequences without new tokens are allowed: the reference skips them)
    "tokens-as-sequences": [(5, 0), (16, 5), (3, 0), (9, 0), (40, 0)],
}
LAYERS = {  # (heads, kv heads, head_dim, sliding window, softcap, sinks, values in the keys)
    "llama-8b": (32, 8, 128, 0, 0.0, False, False),
    "smollm2": (9, 3, 64, 0, 0.0, False, False),
    "gemma2": (8, 4, 256, 24, 30.0, False, False),
    "mha-odd-head-dim": (4, 4, 80, 0, 0.0, False, False),
    "gpt-oss": (16, 2, 64, 24, 0.0, True, False),
    "deepseek-v2-lite-latent": (16, 1, 576, 0, 0.0, False, True),  # MLA absorbed: latent 512 + RoPE 64, one plane
    "deepseek-v3-latent": (128, 1, 576, 0, 0.0, False, True),  # 8 blocks of 16 query heads over one KV head
    "latent-40-heads": (40, 1, 576, 0, 0.0, False, True),  # a last block of heads part empty
}


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def check_against_reference(layer: str, step: str, block_size: int, device: str, dtype: torch.dtype, tolerance: float,
                            cache_dtype: torch.dtype | None = None):  # fmt: skip
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    heads, kv_heads, head_dim, window, softcap, has_sinks, values_in_keys = LAYERS[layer]
    args, _ = random_step(random.Random(seed), STEPS[step], block_size, heads, kv_heads, head_dim, dtype, device,
                          cache_dtype, values_in_keys)  # fmt: skip
    sinks = torch.randn(heads, device=device) if has_sinks else None
    extras = (0, head_dim**-0.5, window, softcap, sinks)
    reference_cache = args[3].clone()
    expected = ops.paged_attention(*args[:3], reference_cache, *args[4:], *extras, "reference")
    actual = ops.paged_attention(*args, *extras, "triton")
    assert torch.isfinite(actual).all(), f"seed {seed}"
    error = relative_error(actual, expected)
    assert error < tolerance, f"seed {seed}: relative error {error:.2e}"
    written = ~torch.isnan(reference_cache.float())
    assert torch.equal(args[3][written].float(), reference_cache[written].float()), f"seed {seed}"  # same slots


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("block_size", [16, 32, 5])
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_triton_matches_reference_on_gpu(layer, step, block_size):
    check_against_reference(layer, step, block_size, "cuda", torch.bfloat16, 1e-2)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("layer", ["llama-8b", "gemma2"])
def test_triton_fp8_cache_matches_reference_on_gpu(layer, step):
    """Both read the same fp8 cache; the rounding into fp8 itself is bounded in test_attention_ops."""
    check_against_reference(layer, step, 16, "cuda", torch.bfloat16, 1e-2, torch.float8_e4m3fn)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("launch", [{"TILE": 64, "num_warps": 4, "num_stages": 3}, {"TILE": 128, "num_warps": 8,
                                    "num_stages": 2}, {"TILE": 16, "num_warps": 2, "num_stages": 4},
                                    {"TILE": 32, "num_warps": 2, "num_stages": 2},
                                    {"TILE": 32, "num_warps": 1, "num_stages": 2},
                                    {"TILE": 64, "num_warps": 1, "num_stages": 3, "ONE_LAUNCH": True},
                                    {"TILE": 32, "num_warps": 4, "num_stages": 3, "ONE_LAUNCH": True},
                                    {"TILE": 64, "num_warps": 4, "num_stages": 2, "ONE_LAUNCH": True}])  # fmt: skip
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
def test_triton_decode_launches_match_reference_on_gpu(monkeypatch, launch, cache_dtype):
    """Each decode launch the benchmark sweeps (triton.DECODE_LAUNCH) computes what the default does."""
    from custom_ops.attention import triton as triton_backend

    monkeypatch.setattr(triton_backend, "DECODE_LAUNCH", launch)
    for block_size in (16, 5):
        check_against_reference("llama-8b", "decode", block_size, "cuda", torch.bfloat16, 1e-2, cache_dtype)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("one_launch", [False, True])
@pytest.mark.parametrize("max_splits", [16, 1])
def test_triton_decode_replays_in_a_cuda_graph(monkeypatch, one_launch, max_splits):
    """No planning: the graph captured for one step's shapes serves other lengths and block tables; in one launch too
    (split: the kernel's last program of a row merges, and each replay finds the counters zero again; one split: the
    kernel writes the cache)."""
    from custom_ops.attention import triton as triton_backend

    monkeypatch.setattr(triton_backend, "DECODE_LAUNCH", {"TILE": 32, "ONE_LAUNCH": one_launch})
    monkeypatch.setattr(triton_backend, "MAX_SPLITS", max_splits)
    check_decode_graph_replay("triton")
    if one_launch and max_splits > 1:  # the graph's launches merged in the kernel (4 sequences: several splits each)
        assert triton_backend._merge_counters
    assert all(not counters.any() for counters in triton_backend._merge_counters.values())


@pytest.mark.gpu
@needs_triton
def test_one_launch_at_one_split_matches_reference_on_gpu(monkeypatch):
    """At one split (as many programs as the GPU takes) the one-launch decode writes the cache in the kernel."""
    from custom_ops.attention import triton as triton_backend

    monkeypatch.setattr(triton_backend, "DECODE_LAUNCH", {"TILE": 32, "ONE_LAUNCH": True})
    monkeypatch.setattr(triton_backend, "MAX_SPLITS", 1)
    for layer in ("llama-8b", "gpt-oss", "smollm2"):
        for cache_dtype in (None, torch.float8_e4m3fn):
            check_against_reference(layer, "decode", 16, "cuda", torch.bfloat16, 1e-2, cache_dtype)
    check_against_reference("gpt-oss", "tokens-as-sequences", 5, "cuda", torch.bfloat16, 1e-2)
    torch.cuda.synchronize()


def fix_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a loop bound into an int with int(<1-element array>), which NumPy >= 2.4
    refuses; read the element instead."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def fix_interpreter_fp8_conversions() -> None:
    """Triton 3.6's interpreter converts to float8 by truncating the mantissa (its round-to-nearest adds the cut-off
    bit without carrying into the exponent), where a GPU rounds to nearest even and saturates at the largest finite
    value: an fp8 KV cache written in the interpreter was 3-11% off the reference. Conversions to or from float8 go
    through torch's instead, as a GPU does them."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dtypes = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2, tl.float16: torch.float16,
              tl.bfloat16: torch.bfloat16, tl.float32: torch.float32}  # fmt: skip
    raw = {8: (np.uint8, torch.uint8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32)}
    convert = interpreter._convert_float

    def converted(input, input_dtype, output_dtype, rounding_mode):
        if 8 not in (input_dtype.primitive_bitwidth, output_dtype.primitive_bitwidth) or not (
            input_dtype in dtypes and output_dtype in dtypes
        ):
            return convert(input, input_dtype, output_dtype, rounding_mode)
        source = torch.from_numpy(np.ascontiguousarray(input).view(raw[input_dtype.primitive_bitwidth][0]))
        values = source.view(dtypes[input_dtype])
        target = dtypes[output_dtype]
        if target.itemsize == 1:  # cvt.rn.satfinite: values past the range saturate (torch's cast gives NaN); NaN stays
            values = values.float().clamp(-torch.finfo(target).max, torch.finfo(target).max)
        bits = output_dtype.primitive_bitwidth
        return values.to(target).view(raw[bits][1]).numpy().view(f"uint{bits}")

    interpreter._convert_float = converted


INTERPRETED = [("gpt-oss", "mixed", 5), ("gpt-oss", "decode", 5), ("smollm2", "decode", 16),
               ("mha-odd-head-dim", "one-long-prefill", 16), ("latent-40-heads", "decode", 16),
               ("latent-40-heads", "short-mixed", 5),  # decode steps: keys split over programs
               ("gpt-oss", "tokens-as-sequences", 5)]  # a program a token, one sequence with 5 of them
# (layer, step, block size, device, dtype, tolerance): float32 sums what the cache holds as the reference does; float16
# (bf16 is beyond the interpreter) rounds the cache's values to the MMA's half-precision operands, as bf16 does on a GPU.
INTERPRETED_FP8_CACHE = [("llama-8b", "decode", 16, "cpu", torch.float32, 1e-4),
                         ("gemma2", "short-mixed", 5, "cpu", torch.float32, 1e-4),
                         ("gpt-oss", "decode", 5, "cpu", torch.float16, 1e-2)]  # fmt: skip


@needs_triton
def test_triton_kernel_in_the_interpreter():
    """float32 on CPU through TRITON_INTERPRET=1: the same kernel code, checked without a GPU."""
    from conftest import run_in_interpreter  # here: the interpreter's process imports this module without conftest

    code = (
        "import torch, tests.test_triton_attention as t\n"
        "t.fix_interpreter_loop_bounds()\n"
        f"for case in {INTERPRETED!r}: t.check_against_reference(*case, 'cpu', torch.float32, 1e-4)\n"
        "import custom_ops.attention.triton as backend\n"  # a decode launch of longer key tiles (DECODE_LAUNCH)
        "backend.DECODE_LAUNCH = {'TILE': 64}\n"
        "t.check_against_reference('gpt-oss', 'decode', 5, 'cpu', torch.float32, 1e-4)\n"
        # at 2-9 splits (these steps' here) the default merges in the kernel: merge_splits_kernel's own launch too
        "assert 1 < backend.decode_splits(5, 2, torch.device('cpu')) <= backend.ONE_LAUNCH_MAX_SPLITS\n"
        "backend.DECODE_LAUNCH = {'TILE': 32, 'ONE_LAUNCH': False}\n"
        "for case in [('gpt-oss', 'decode', 5), ('smollm2', 'decode', 16)]:\n"
        "    t.check_against_reference(*case, 'cpu', torch.float32, 1e-4)\n"
        # a decode step in one launch: the splits merged by the last program of each row, not a second kernel (twice:
        # each launch leaves the counters zero for the next), and at one split the cache written by the kernel
        "backend.DECODE_LAUNCH = {'TILE': 32, 'ONE_LAUNCH': True}\n"
        "cases = [('gpt-oss', 'decode', 5)] * 2 + [('smollm2', 'decode', 16), ('gpt-oss', 'tokens-as-sequences', 5)]\n"
        "for case in cases: t.check_against_reference(*case, 'cpu', torch.float32, 1e-4)\n"
        "assert backend._merge_counters and all(device.type == 'cpu' for device, _ in backend._merge_counters)\n"
        "assert not any(counters.any() for counters in backend._merge_counters.values())\n"
        "max_splits, backend.MAX_SPLITS = backend.MAX_SPLITS, 1\n"
        "write, backend.write_kv_cache_fast = backend.write_kv_cache_fast, None\n"  # a separate write would fail
        "for case in cases[1:]: t.check_against_reference(*case, 'cpu', torch.float32, 1e-4)\n"
        "backend.MAX_SPLITS, backend.DECODE_LAUNCH, backend.write_kv_cache_fast = max_splits, {'TILE': 32}, write\n"
        "t.fix_interpreter_fp8_conversions()\n"  # an fp8 cache: written by the kernels and read as on a GPU
        f"for case in {INTERPRETED_FP8_CACHE!r}: t.check_against_reference(*case, torch.float8_e4m3fn)\n"
        # one launch over an fp8 cache: split and merged in the kernel, then at one split the kernel's own write
        "backend.DECODE_LAUNCH = {'TILE': 32, 'ONE_LAUNCH': True}\n"
        "t.check_against_reference('llama-8b', 'decode', 16, 'cpu', torch.float32, 1e-4, torch.float8_e4m3fn)\n"
        "backend.MAX_SPLITS = 1\n"
        "t.check_against_reference('llama-8b', 'decode', 16, 'cpu', torch.float32, 1e-4, torch.float8_e4m3fn)\n"
        "backend.MAX_SPLITS, backend.DECODE_LAUNCH = max_splits, {'TILE': 32}\n"
        # float16 MMAs over an fp8 cache with q past their limit (a bf16 q can reach far beyond float16's range; here
        # the limit comes down to q's values): q is divided by a power of 2 and the scores multiplied back
        "import triton.language as tl, custom_ops.attention.triton_kernel as kernel\n"
        "kernel.FP16_Q_LIMIT = tl.constexpr(0.25)\n"
        "t.check_against_reference('gpt-oss', 'decode', 5, 'cpu', torch.float16, 1e-2, torch.float8_e4m3fn)\n"
        "t.check_against_reference('llama-8b', 'mixed', 16, 'cpu', torch.float16, 1e-2, torch.float8_e4m3fn)\n"
        "t.check_against_reference('gemma2', 'short-mixed', 5, 'cpu', torch.float16, 1e-2, torch.float8_e4m3fn)\n"
    )
    run_in_interpreter(code)
