"""The tuner: for one op and shape bucket, time its candidates and keep the fastest that computes the op.

An op takes part through an `OpTuning` (the runner interface): its candidates for a bucket, the required
fallback first; the heuristic's pick (what runs without tuning); input sets for a bucket; the reference output
and the tolerance a candidate is held to. `tune` then

1. runs every candidate once on the first input set and checks it against the reference: one that raises or
   differs is out (logged with why), and if the fallback is out the op cannot be tuned (an error naming it);
2. times the rest with `timer` (on a GPU `cuda_timer`: a round of calls captured in a CUDA graph and replayed, as a
   step runs, CUDA events, the median of repeats, the input sets rotated call by call so that no candidate finds
   its operands in L2 from the call before);
3. stores the winner, its config and every time in the `KernelCache` at once (an interrupted run keeps what it
   found).

`choose` is what compilation asks, under `CompileConfig.autotune`: "off" the heuristic; "cache" the cached
winner or the heuristic, never timing anything; "full" the cached winner, tuning a miss.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from autotune.kernel_cache import CacheEntry, KernelCache, source_hash

log = logging.getLogger("compiled_llm.autotune")

# (run, input sets[, capture=False for a candidate that is not `capturable`]) -> microseconds a call
Timer = Callable[..., float]

L2_OVERFLOW_BYTES = 200_000_000  # what the input sets an op streams should add up to: past any GPU's L2
MAX_INPUT_SETS = 64  # for small operands: a CUDA graph of this many calls a round (they sit in L2 in a step too)


def input_copies(bytes_a_set: int) -> int:
    """How many input sets of `bytes_a_set` streamed bytes an OpTuning's `inputs` makes: enough to overflow L2, two
    where one alone does, at most MAX_INPUT_SETS."""
    return min(MAX_INPUT_SETS, max(2, -(-L2_OVERFLOW_BYTES // bytes_a_set)))


@dataclass(frozen=True)
class Candidate:
    """One way to compute an op: `run(*inputs)`, with `source` the hash of the code it runs (autotune.source_hash
    over the kernel and its launcher) and `config` what distinguishes it from the op's other candidates of the
    same kernel (tile sizes)."""

    name: str
    run: Callable[..., Any]
    source: str
    config: dict = field(default_factory=dict)
    capturable: bool = field(default=True, compare=False)
    """Whether a CUDA graph can capture a call (no host sync): the timer replays those, launches the others (a
    capture that fails midway leaves the CUDA RNG unusable for the rest of the process)."""
    dtypes: tuple[torch.dtype, ...] | None = field(default=None, compare=False)
    """The activation dtypes the candidate takes (None: all): in another, the tuner leaves it out quietly, where a
    candidate that raises is out with a warning."""
    host_us: Callable[[Sequence[tuple]], float] | None = field(default=None, compare=False)
    """Host time a call costs a step beyond its launches (a planner's, amortized over the calls of a step), added
    to its GPU time: a step's host work runs beside the GPU only while the host keeps ahead."""

    @property
    def identity(self) -> str:
        """What a cached choice must match: the source and the config (a changed tile is a changed candidate)."""
        return source_hash(self.source, json.dumps(self.config, sort_keys=True, default=str))


class OpTuning(Protocol):
    op: str

    def candidates(self, bucket: dict) -> list[Candidate]:
        """The candidates for `bucket`, the fallback (always correct, always available) first."""
        ...

    def heuristic(self, bucket: dict) -> str:
        """The candidate the op runs untuned."""
        ...

    def inputs(self, bucket: dict, dtype: torch.dtype, copies: int) -> list[tuple]:
        """About `copies` input sets for `bucket`, fresh random values, together larger than the GPU's L2 where the
        op streams its operands (the timer rotates through them; two are enough where each alone is larger)."""
        ...

    def reference(self, *inputs) -> torch.Tensor:
        """The op's reference output (its CPU-runnable definition)."""
        ...

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        """(rtol, atol relative to the reference's largest magnitude) a candidate is held to."""
        ...


@dataclass
class Choice:
    """What runs for an op in a bucket, and where that came from: "cache", "tuned" or "heuristic"."""

    candidate: Candidate
    source: str
    times_us: dict[str, float] = field(default_factory=dict)


class TuningError(RuntimeError):
    pass


def cuda_timer(run: Callable[..., Any], input_sets: Sequence[tuple], warmup: int = 3, repeats: int = 20,
               capture: bool = True) -> float:  # fmt: skip
    """Microseconds a call of `run` on the GPU, as a step replays it: one round (a call per input set) captured in
    a CUDA graph after `warmup` calls on a side stream, then the median over `repeats` replays timed with CUDA
    events. Plain launches would add the host's launch cost, which a replayed step does not pay; a candidate that
    cannot be captured is timed that way anyway (and logged)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(warmup):
            run(*input_sets[i % len(input_sets)])
    torch.cuda.current_stream().wait_stream(stream)

    def one_round():
        for inputs in input_sets:
            run(*inputs)

    replay = one_round
    try:
        if capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one_round()
            replay = graph.replay
    except RuntimeError as error:
        log.info("autotune: timing %s by plain launches (it cannot be captured: %s)", getattr(run, "__name__", run), error)
    from compiled_llm.bench.measure import event_median_s  # here: compiled_llm imports autotune

    replay()
    return event_median_s(replay, repeats) * 1e6 / len(input_sets)


def _why_wrong(tuning: OpTuning, candidate: Candidate, inputs: tuple, dtype: torch.dtype) -> str | None:
    """None if the candidate computes the op on `inputs`, else why not."""
    try:
        actual = candidate.run(*inputs)
    except Exception as error:  # noqa: BLE001  (a candidate that cannot run this bucket is out, not fatal)
        return f"raised {type(error).__name__}: {error}"
    expected = tuning.reference(*inputs)
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return f"returned {getattr(actual, 'shape', type(actual))}, the reference {tuple(expected.shape)}"
    rtol, atol = tuning.tolerance(dtype)
    expected, actual = expected.float(), actual.float().to(expected.device)
    if expected.numel() == 0:
        return None
    scale = expected.abs().max().item()
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol * scale):
        error = ((actual - expected).abs().max() / max(scale, 1e-30)).item()
        return f"differs from the reference by {error:.3g} of its largest value (tolerance {atol:g})"
    return None


def tune(tuning: OpTuning, bucket: dict, dtype: torch.dtype, cache: KernelCache, timer: Timer = cuda_timer,
         copies: int = 4) -> Choice:  # fmt: skip
    """Time `tuning`'s candidates for `bucket` and store the fastest correct one (see the module docstring)."""
    candidates = tuning.candidates(bucket)
    if not candidates:
        raise TuningError(f"{tuning.op}: no candidates for {bucket}")
    input_sets = tuning.inputs(bucket, dtype, copies)
    times: dict[str, float] = {}
    for index, candidate in enumerate(candidates):
        if index and candidate.dtypes is not None and dtype not in candidate.dtypes:
            log.debug("autotune %s %s: %s does not take %s", tuning.op, bucket, candidate.name, dtype)
            continue
        why = _why_wrong(tuning, candidate, input_sets[0], dtype)
        if why is not None:
            if index == 0:
                raise TuningError(f"{tuning.op}: its fallback {candidate.name!r} fails its own check for {bucket}: {why}")
            log.warning("autotune %s %s: %s is out: %s", tuning.op, bucket, candidate.name, why)
            continue
        if candidate.capturable:
            times[candidate.name] = timer(candidate.run, input_sets)
        else:
            times[candidate.name] = timer(candidate.run, input_sets, capture=False)
        if candidate.host_us is not None:
            times[candidate.name] += candidate.host_us(input_sets)
    winner = min(times, key=times.get)
    chosen = next(c for c in candidates if c.name == winner)
    try:
        cache.put(CacheEntry(op=tuning.op, dtype=str(dtype).removeprefix("torch."), bucket=bucket,
                             candidates={c.name: c.identity for c in candidates}, winner=winner, config=chosen.config,
                             times_us=times))  # fmt: skip
    except OSError as error:  # the choice stands; only the next run will have to tune it again
        log.warning("autotune %s %s: the kernel cache could not store the choice (%s)", tuning.op, bucket, error)
    log.info("autotune %s %s: %s (%s)", tuning.op, bucket, winner,
             ", ".join(f"{name} {t:.1f} us" for name, t in sorted(times.items(), key=lambda kv: kv[1])))  # fmt: skip
    return Choice(chosen, "tuned", times)


def choose(tuning: OpTuning, bucket: dict, dtype: torch.dtype, mode: str, cache: KernelCache | None,
           timer: Timer = cuda_timer) -> Choice:  # fmt: skip
    """The candidate to run under CompileConfig.autotune `mode` (see the module docstring)."""
    if mode not in ("off", "cache", "full"):
        raise ValueError(f"autotune mode must be one of off, cache, full; got {mode!r}")
    if mode != "off" and cache is None:
        raise ValueError(f"autotune={mode!r} needs a kernel cache")
    candidates = {c.name: c for c in tuning.candidates(bucket)}
    if mode != "off":
        hit = cache.get(tuning.op, str(dtype).removeprefix("torch."), bucket, {n: c.identity for n, c in candidates.items()})
        if hit is not None:
            return Choice(candidates[hit.winner], "cache", hit.times_us)
        if mode == "full":
            return tune(tuning, bucket, dtype, cache, timer)
    return Choice(candidates[tuning.heuristic(bucket)], "heuristic")
