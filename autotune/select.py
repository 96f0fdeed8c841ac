"""`select_kernels`: what compilation asks the autotuner, between the passes and Inductor.

Each op family registers its tuning (`register`: an OpTuning that also lists the buckets a graph needs, `buckets`,
and installs a choice where its calls read it, `install`). For every bucket of the rewritten graph, under
`CompileConfig.autotune`, `tuner.choose` picks the candidate (off: none is asked, each op runs its heuristic or
what an earlier compile of the process installed for the shape;
cache: the cached winner, else the heuristic, nothing timed; full: a miss is tuned and stored), and the choice is
installed before the first step runs, so the compiled graph and its CUDA-graph captures run it. The compile report
lists every choice, where it came from and its measured times.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from autotune.kernel_cache import KernelCache, format_bucket
from autotune.tuner import Candidate, Choice, OpTuning, TuningError, choose, cuda_timer

log = logging.getLogger("compiled_llm.autotune")


class GraphOpTuning(OpTuning, Protocol):
    def buckets(self, gm: torch.fx.GraphModule) -> list[dict]:
        """The buckets the calls in `gm` fall in (none where the graph does not call the op's tunable kernels)."""
        ...

    def install(self, bucket: dict, candidate: Candidate, device: torch.device) -> None:
        """Make `candidate` what the op runs for `bucket` on `device` from now on in this process."""
        ...

    # Optional: `finish(gm, device, choices)`, called once after every bucket is installed, with the op's
    # KernelChoices (which it may amend), for a tuning whose choices live in the graph itself (paged attention's
    # backend argument).


def graph_value(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """The tensor behind a graph node, for a tuning's `buckets`: a get_attr's attribute, else the node's fake
    value (which a rewritten graph loaded from the cache lacks: a tuning reads weights, not activations)."""
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    return node.meta["val"]


def device_index(device: torch.device) -> int:
    """A tuning table's device key, as `Tensor.get_device()` gives it for tensors on `device` (-1 on the CPU)."""
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


_TUNINGS: dict[str, GraphOpTuning] = {}


def register(tuning: GraphOpTuning) -> GraphOpTuning:
    """Add an op family's tuning (by its op name; a second registration replaces the first)."""
    _TUNINGS[tuning.op] = tuning
    return tuning


@dataclass
class KernelChoice:
    """One line of the compile report: `op` in `bucket` runs `winner`, from "cache", "tuned", "heuristic" (the
    candidate `heuristic` names is what runs untuned) or "nearest" (an untuned bucket given the choice of its
    nearest tuned one)."""

    op: str
    bucket: dict
    winner: str
    source: str
    heuristic: str
    times_us: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        line = f"{self.op} {format_bucket(self.bucket)}: {self.winner} ({self.source}"
        if self.times_us:
            fastest = sorted(self.times_us.items(), key=lambda kv: kv[1])[:3]
            line += "; " + ", ".join(f"{name} {t:.1f} us" for name, t in fastest)
        return line + ")"


def count_sources(choices: list[KernelChoice]) -> str:
    """"3 cache, 9 heuristic": how many choices came from where (the report, the log)."""
    counts = {source: sum(c.source == source for c in choices) for source in ("cache", "tuned", "nearest", "heuristic")}
    return ", ".join(f"{n} {source}" for source, n in counts.items() if n)


def select_kernels(gm: torch.fx.GraphModule, mode: str, cache_dir, device: torch.device, dtype: torch.dtype,
                   timer=cuda_timer) -> list[KernelChoice]:  # fmt: skip
    """Choose and install a candidate for every bucket of every registered op in `gm` (see the module docstring).
    With `mode` "off" nothing is asked."""
    if mode == "off":
        return []
    if mode == "full" and device.type != "cuda" and timer is cuda_timer:
        log.info("autotune='full' times kernels on a CUDA GPU; a model on %s reads the kernel cache only", device.type)
        mode = "cache"
    cache = KernelCache(cache_dir, device)
    work = [(tuning, bucket) for tuning in _TUNINGS.values() for bucket in tuning.buckets(gm)]
    choices = []
    for done, (tuning, bucket) in enumerate(work):
        if mode == "full":
            log.info("autotune: %d/%d %s %s", done + 1, len(work), tuning.op, bucket)
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                choice = choose(tuning, bucket, dtype, mode, cache, timer)
        except (TuningError, RuntimeError) as error:  # out of memory for the inputs, say: the op still runs
            log.warning("autotune %s %s: tuning failed (%s); it runs its heuristic", tuning.op, bucket, error)
            candidate = next(c for c in tuning.candidates(bucket) if c.name == tuning.heuristic(bucket))
            choice = Choice(candidate, "heuristic")
        tuning.install(bucket, choice.candidate, device)
        choices.append(KernelChoice(tuning.op, bucket, choice.candidate.name, choice.source, tuning.heuristic(bucket),
                                    choice.times_us))  # fmt: skip
    for tuning in _TUNINGS.values():
        if hasattr(tuning, "finish"):
            tuning.finish(gm, device, [choice for choice in choices if choice.op == tuning.op])
    if choices:
        log.info("autotune=%s: %d choices (%s)", mode, len(choices), count_sources(choices))
    return choices
