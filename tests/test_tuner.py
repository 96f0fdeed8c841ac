"""autotune.tuner with fake timings on the CPU: the fastest candidate that computes the op wins, one that is wrong
or raises never does, the fallback must pass, and `choose` follows CompileConfig.autotune's modes ("cache" never
times anything)."""

from __future__ import annotations

import pytest
import torch

from autotune.kernel_cache import KernelCache
from autotune.tuner import Candidate, TuningError, choose, tune


class ToyMatmul:
    """x @ w with four candidates: the fallback, a correct one, a fast wrong one, and one that raises."""

    op = "toy::matmul"

    def __init__(self, fallback_ok: bool = True, sources: dict | None = None, half_only: bool = False):
        self.sources = {"fallback": "s0", "mm": "s1", "wrong": "s2", "broken": "s3", **(sources or {})}
        self.fallback_ok = fallback_ok
        self.half_only = half_only  # a fifth candidate that takes bfloat16 only (and raises in float32)

    def candidates(self, bucket):
        def fallback(x, w):
            return x @ w if self.fallback_ok else x @ w * 2

        def broken(x, w):
            raise RuntimeError("no kernel for this shape")

        runs = {"fallback": fallback, "mm": torch.mm, "wrong": lambda x, w: x @ w + 0.5, "broken": broken}
        found = [Candidate(name, run, self.sources[name], {"name": name}) for name, run in runs.items()]
        if self.half_only:
            found.append(Candidate("half", broken, "s4", {"name": "half"}, dtypes=(torch.bfloat16,)))
        return found

    def heuristic(self, bucket):
        return "fallback"

    def inputs(self, bucket, dtype, copies):
        generator = torch.Generator().manual_seed(0)
        return [(torch.randn(bucket["rows"], 8, generator=generator, dtype=dtype),
                 torch.randn(8, 4, generator=generator, dtype=dtype)) for _ in range(copies)]  # fmt: skip

    def reference(self, x, w):
        return x.double() @ w.double()

    def tolerance(self, dtype):
        return 1e-5, 1e-5


def fake_timer(times: dict[str, float], tuning: ToyMatmul, calls: list):
    names = {}

    def timer(run, input_sets):
        if not names:
            names.update({c.run: c.name for c in tuning.candidates({})})
        name = next(n for r, n in names.items() if r is run or getattr(r, "__code__", None) is getattr(run, "__code__", 0))
        calls.append((name, len(input_sets)))
        return times[name]

    return timer


FAKE_TIMES = {"fallback": 10.0, "mm": 7.0, "wrong": 1.0, "broken": 0.5}
BUCKET = {"rows": 3}


def test_the_fastest_correct_candidate_wins_and_is_stored_at_once(tmp_path, caplog):
    tuning, calls, cache = ToyMatmul(), [], KernelCache(tmp_path, key="test")
    choice = tune(tuning, BUCKET, torch.float32, cache, fake_timer(FAKE_TIMES, tuning, calls))
    assert choice.source == "tuned" and choice.candidate.name == "mm"
    assert choice.times_us == {"fallback": 10.0, "mm": 7.0}  # the wrong and the raising ones were never timed
    assert sorted(name for name, _ in calls) == ["fallback", "mm"] and all(n == 4 for _, n in calls)
    assert any("wrong is out: differs" in r.getMessage() for r in caplog.records)
    assert any("broken is out: raised RuntimeError" in r.getMessage() for r in caplog.records)
    (entry,) = cache.entries()
    assert entry.winner == "mm" and entry.config == {"name": "mm"} and entry.times_us == choice.times_us
    assert entry.candidates == {c.name: c.identity for c in tuning.candidates(BUCKET)}


def test_a_candidate_for_other_dtypes_is_left_out_quietly(tmp_path, caplog):
    """A candidate whose `dtypes` do not hold the bucket's is neither run nor warned about (it would raise)."""
    tuning, calls, cache = ToyMatmul(half_only=True), [], KernelCache(tmp_path, key="test")
    choice = tune(tuning, BUCKET, torch.float32, cache, fake_timer({**FAKE_TIMES, "half": 0.1}, tuning, calls))
    assert choice.candidate.name == "mm" and "half" not in choice.times_us
    assert not any("half" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert any("broken is out" in r.getMessage() for r in caplog.records)


def test_a_fallback_that_fails_its_own_check_is_an_error_naming_the_op(tmp_path):
    tuning = ToyMatmul(fallback_ok=False)
    with pytest.raises(TuningError, match=r"toy::matmul: its fallback 'fallback' fails"):
        tune(tuning, BUCKET, torch.float32, KernelCache(tmp_path, key="test"), fake_timer(FAKE_TIMES, tuning, []))


def test_choose_follows_the_modes(tmp_path):
    tuning, cache = ToyMatmul(), KernelCache(tmp_path, key="test")

    def never(run, input_sets):
        raise AssertionError("timed in a mode that must not time")

    assert choose(tuning, BUCKET, torch.float32, "cache", cache, never).source == "heuristic"  # a miss
    calls = []
    tuned = choose(tuning, BUCKET, torch.float32, "full", cache, fake_timer(FAKE_TIMES, tuning, calls))
    assert (tuned.source, tuned.candidate.name, len(calls)) == ("tuned", "mm", 2)
    for mode in ("cache", "full"):  # a hit: nothing timed
        hit = choose(tuning, BUCKET, torch.float32, mode, cache, never)
        assert (hit.source, hit.candidate.name, hit.times_us["mm"]) == ("cache", "mm", 7.0)
    assert choose(tuning, BUCKET, torch.float32, "off", cache, never).candidate.name == "fallback"
    assert choose(tuning, {"rows": 5}, torch.float32, "cache", cache, never).source == "heuristic"  # other bucket
    assert choose(tuning, BUCKET, torch.float64, "cache", cache, never).source == "heuristic"  # other dtype
    changed = ToyMatmul(sources={"mm": "s1-edited"})  # a candidate's source changed: the entry is stale
    assert choose(changed, BUCKET, torch.float32, "cache", cache, never).source == "heuristic"
    retiled = ToyMatmul()  # the same sources, another config for the winner: stale too
    retiled.candidates = lambda bucket: [
        Candidate(c.name, c.run, c.source, {"name": c.name, "BLOCK": 64}) for c in ToyMatmul().candidates(bucket)
    ]
    assert choose(retiled, BUCKET, torch.float32, "cache", cache, never).source == "heuristic"
    with pytest.raises(ValueError, match="needs a kernel cache"):
        choose(tuning, BUCKET, torch.float32, "full", None, never)
    with pytest.raises(ValueError, match="off, cache, full"):
        choose(tuning, BUCKET, torch.float32, "always", cache, never)
