"""The reference attention ops against a naive float64 computation written here, independently."""

from __future__ import annotations

import math
import random

import pytest
import torch

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from tests.paged_steps import random_step

ops = torch.ops.compiled_llm


def naive_attention(q, k, v, scale, window, softcap, sinks):
    """float64, one query and one head at a time: q [n, Hq, D] are the last n of the L tokens in k/v."""
    q, k, v = q.double(), k.double(), v.double()
    n, num_heads, _ = q.shape
    length, num_kv_heads, _ = k.shape
    out = torch.zeros(n, num_heads, v.shape[-1], dtype=torch.float64)
    for i in range(n):
        pos = length - n + i
        for h in range(num_heads):
            kv_head = h // (num_heads // num_kv_heads)
            keys = [j for j in range(pos + 1) if window == 0 or pos - j < window]
            logits = torch.stack([(q[i, h] @ k[j, kv_head]) * scale for j in keys])
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            weights = torch.exp(logits - logits.max())
            denominator = weights.sum()
            if sinks is not None:
                denominator = denominator + torch.exp(sinks[h].double() - logits.max())
            out[i, h] = sum(w * v[j, kv_head] for w, j in zip(weights / denominator, keys))
    return out


FEATURES = [
    pytest.param(dict(num_heads=4, num_kv_heads=4, window=0, softcap=0.0, sinks=False), id="mha"),
    pytest.param(dict(num_heads=4, num_kv_heads=2, window=0, softcap=0.0, sinks=False), id="gqa"),
    pytest.param(dict(num_heads=4, num_kv_heads=1, window=5, softcap=0.0, sinks=False), id="mqa-window"),
    pytest.param(dict(num_heads=4, num_kv_heads=2, window=0, softcap=5.0, sinks=False), id="softcap"),
    pytest.param(dict(num_heads=4, num_kv_heads=2, window=3, softcap=0.0, sinks=True), id="sinks-window"),
]


@pytest.mark.parametrize("features", FEATURES)
def test_canonical_attention_matches_naive(features):
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    length, head_dim = 11, 8
    q = torch.randn(length, features["num_heads"], head_dim)
    k = torch.randn(length, features["num_kv_heads"], head_dim)
    v = torch.randn(length, features["num_kv_heads"], head_dim)
    sinks = torch.randn(features["num_heads"]) if features["sinks"] else None
    scale = 1 / math.sqrt(head_dim)
    out = ops.attention(q, k, v, 0, scale, features["window"], features["softcap"], sinks)
    expected = naive_attention(q, k, v, scale, features["window"], features["softcap"], sinks)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


def mixed_batch(rng: random.Random, block_size: int, num_kv_heads: int, head_dim: int):
    """Sequences with tokens already cached and new tokens to compute: decodes (1 new), prefill chunks
    (several new after a cached prefix) and fresh prefills (no cached prefix), in random block order."""
    shapes = [(0, 7), (9, 1), (3, 5), (17, 1), (0, 1), (12, 9)]  # (cached, new)
    rng.shuffle(shapes)
    max_blocks = max(math.ceil((c + n) / block_size) for c, n in shapes)
    pool = list(range(len(shapes) * max_blocks + 3))
    rng.shuffle(pool)  # blocks of a sequence are scattered over the cache
    sequences = []
    for cached, new in shapes:
        count = math.ceil((cached + new) / block_size)
        blocks, pool = pool[:count], pool[count:]
        keys = torch.randn(cached + new, num_kv_heads, head_dim)
        values = torch.randn(cached + new, num_kv_heads, head_dim)
        sequences.append(dict(cached=cached, new=new, blocks=blocks, keys=keys, values=values))
    return sequences, len(pool) + sum(len(s["blocks"]) for s in sequences), max_blocks


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("features", FEATURES)
def test_paged_attention_mixed_batch_matches_naive(features, block_size, backend):
    if backend == "sdpa" and (features["softcap"] or features["sinks"]):
        pytest.skip("sdpa leaves soft-cap and sinks to the reference backend")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_heads, num_kv_heads, head_dim = features["num_heads"], features["num_kv_heads"], 8
    sequences, num_blocks, max_blocks = mixed_batch(rng, block_size, num_kv_heads, head_dim)
    kv_cache = torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), float("nan"))  # unwritten: NaN

    def slot(seq, p):
        return seq["blocks"][p // block_size] * block_size + p % block_size

    for seq in sequences:  # the cached prefix, written by an earlier step
        for p in range(seq["cached"]):
            block, offset = divmod(slot(seq, p), block_size)
            kv_cache[block, 0, offset] = seq["keys"][p]
            kv_cache[block, 1, offset] = seq["values"][p]

    new = [range(s["cached"], s["cached"] + s["new"]) for s in sequences]
    q = torch.randn(sum(s["new"] for s in sequences), num_heads, head_dim)
    k = torch.cat([s["keys"][r.start : r.stop] for s, r in zip(sequences, new)])
    v = torch.cat([s["values"][r.start : r.stop] for s, r in zip(sequences, new)])
    slot_mapping = torch.tensor([slot(s, p) for s, r in zip(sequences, new) for p in r])
    block_table = torch.tensor([s["blocks"] + [0] * (max_blocks - len(s["blocks"])) for s in sequences], dtype=torch.int32)
    query_start_loc = torch.tensor([0] + [sum(s["new"] for s in sequences[: i + 1]) for i in range(len(sequences))], dtype=torch.int32)
    seq_lens = torch.tensor([s["cached"] + s["new"] for s in sequences], dtype=torch.int32)
    sinks = torch.randn(num_heads) if features["sinks"] else None
    scale = 0.3

    out = ops.paged_attention(q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens, 0, scale,
                              features["window"], features["softcap"], sinks, backend)  # fmt: skip

    for i, seq in enumerate(sequences):
        start, end = query_start_loc[i].item(), query_start_loc[i + 1].item()
        expected = naive_attention(q[start:end], seq["keys"], seq["values"], scale, features["window"],
                                   features["softcap"], sinks)  # fmt: skip
        torch.testing.assert_close(out[start:end].double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}, seq {i}: {m}")
        for p in new[i]:  # the step's keys/values landed in the cache
            block, offset = divmod(slot(seq, p), block_size)
            assert torch.equal(kv_cache[block, 0, offset], seq["keys"][p])
            assert torch.equal(kv_cache[block, 1, offset], seq["values"][p])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_with_values_in_the_keys_matches_naive(backend, block_size, window):
    """A one-plane cache (multi-head latent attention, absorbed): v is k, stored once, read as both."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_heads, head_dim = 4, 8
    args, _ = random_step(rng, [(0, 7), (9, 1), (3, 5), (17, 1)], block_size, num_heads, 1, head_dim, torch.float32,
                          "cpu", values_in_keys=True)  # fmt: skip
    q, k, v, kv_cache, _, table, query_start_loc, seq_lens = args
    assert v is k and kv_cache.shape[1] == 1
    cached_keys = _cached_keys(kv_cache, table, seq_lens)  # the prefixes an earlier step wrote, then this step's
    out = ops.paged_attention(*args, 0, 0.3, window, 0.0, None, backend)
    for s in range(len(seq_lens)):
        start, end = query_start_loc[s].item(), query_start_loc[s + 1].item()
        keys = torch.cat([cached_keys[s][: seq_lens[s] - (end - start)], k[start:end]])
        expected = naive_attention(q[start:end], keys, keys, 0.3, window, 0.0, None)
        torch.testing.assert_close(out[start:end].double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(_cached_keys(kv_cache, table, seq_lens)[1][-1], k[query_start_loc[1]])  # written once, plane 0


def _cached_keys(kv_cache, table, seq_lens) -> list[torch.Tensor]:
    return [kv_cache[table[s].long(), 0].flatten(0, 1)[: seq_lens[s]].clone() for s in range(len(seq_lens))]


def test_paged_attention_writes_only_the_step_slots_and_passes_opcheck():
    torch.manual_seed(random.randrange(1 << 30))
    kv_cache = torch.randn(4, 2, 4, 2, 8)
    before = kv_cache.clone()
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    args = (q, k, v, kv_cache, torch.tensor([5, 6]), torch.tensor([[1, 0]], dtype=torch.int32),
            torch.tensor([0, 2], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 0, 0.5, 0, 0.0, None,
            "reference")  # fmt: skip
    ops.paged_attention(*args)
    changed = (kv_cache != before).flatten(2).any(-1)  # [block, k|v]
    assert changed.nonzero().tolist() == [[1, 0], [1, 1]]
    assert torch.equal(kv_cache[1, 0, 1:3], k) and torch.equal(kv_cache[1, 1, 1:3], v)
    assert torch.equal(kv_cache[1, :, [0, 3]], before[1, :, [0, 3]])
    torch.library.opcheck(torch.ops.compiled_llm.paged_attention.default, args)
    torch.library.opcheck(torch.ops.compiled_llm.attention.default, (q, k, v, 0, 0.5, 2, 0.0, torch.randn(4)))


def test_fp8_cache_rounding_stays_within_its_bound():
    """With an fp8 (e4m3) cache the reference attends over the rounded keys/values exactly, and the output
    moves by less than e4m3's largest relative rounding error (2**-4) from the full-precision one."""
    from tests.paged_steps import random_step

    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    shapes = [(0, 37), (20, 1), (5, 16), (63, 1), (100, 30)]
    args, _ = random_step(random.Random(seed), shapes, 16, 8, 2, 64, torch.float32, "cpu")
    q, k, v, cache, *metadata = args  # cache: float32, NaN where unwritten
    extras = (0, 0.125, 0, 0.0, None, "reference")
    exact = ops.paged_attention(q, k, v, cache.clone(), *metadata, *extras)
    fp8_cache = cache.to(torch.float8_e4m3fn)
    fp8 = ops.paged_attention(q, k, v, fp8_cache, *metadata, *extras)

    def round_trip(x):  # float32 holding what an fp8 cache holds
        return x.to(torch.float8_e4m3fn).float()

    rounded = ops.paged_attention(q, round_trip(k), round_trip(v), round_trip(cache), *metadata, *extras)
    assert fp8_cache.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(fp8, rounded, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    error = ((fp8 - exact).norm() / exact.norm()).item()
    assert 0 < error < 2**-4, f"seed {seed}: relative error {error}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("step", ["mixed", "decode", "one-decode", "fresh-prefill"])
def test_sdpa_planned_once_for_every_layer(step, window, device):
    """The sdpa backend as the runner drives it: the step planned once (SdpaPlanner), then several layers
    (caches of other head counts) attend with that plan, each as the reference does, over a cache whose
    unwritten slots hold NaN. A plan for another step is refused, not used."""
    from custom_ops import planned_step
    from custom_ops.attention.sdpa import SdpaPlanner
    from tests.paged_steps import random_step

    shapes = {
        "mixed": [(0, 7), (9, 1), (3, 5), (17, 1), (0, 1), (12, 9)],
        "decode": [(9, 1), (17, 1), (1, 1), (30, 1)],
        "one-decode": [(40, 1)],
        "fresh-prefill": [(0, 13)],
    }[step]
    seed = random.randrange(1 << 30)
    torch.manual_seed(seed)
    planner = SdpaPlanner({}, 4, torch.device(device))
    planned = False
    for num_heads, num_kv_heads, head_dim in [(4, 2, 8), (6, 3, 16), (4, 4, 8)]:
        args, metadata = random_step(random.Random(seed), shapes, 4, num_heads, num_kv_heads, head_dim, torch.float32,
                                     device)  # fmt: skip
        if not planned:  # the same block tables for every layer: one plan
            planner.plan(metadata)
            planned = True
        q, k, v, cache, *rest = args
        extras = (0, 0.3, window, 0.0, None)
        reference_cache = cache.clone()
        expected = ops.paged_attention(q, k, v, reference_cache, *rest, *extras, "reference")
        with planned_step({"sdpa": planner}):
            out = ops.paged_attention(q, k, v, cache, *rest, *extras, "sdpa")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
        written = ~torch.isnan(reference_cache)
        assert torch.equal(cache[written], reference_cache[written]) and torch.isnan(cache[~written]).all()

    other, _ = random_step(random.Random(seed), shapes + [(2, 1)], 4, 4, 2, 8, torch.float32, device)
    with planned_step({"sdpa": planner}), pytest.raises(RuntimeError, match="other than the one planned"):
        ops.paged_attention(*other, 0, 0.3, window, 0.0, None, "sdpa")
    moved = [t.clone() for t in args[5:8]]
    moved[2][0] += 1  # the same shapes, another length
    with planned_step({"sdpa": planner}), pytest.raises(RuntimeError, match="other than the one planned"):
        ops.paged_attention(*args[:5], *moved, 0, 0.3, window, 0.0, None, "sdpa")
