"""Phased paged-attention backends: one layer, a backend per step phase and decode batch size.

No attention kernel is fastest everywhere (BENCHMARKS.md, decode attention per layer: Triton's split-KV kernel
at one sequence and short contexts, FlashInfer's at long ones), so the autotuner may give a layer a backend name
made of rules, checked in order, the first that matches a call running it:

    decode<=8:triton,decode:flashinfer,prefill:flashinfer

`decode` matches steps where every sequence computes one token (`<=N`: of at most N sequences, padding included,
so a rule covers whole captured CUDA-graph batch sizes); `prefill` every other step (prefill and mixed). The
phase and batch are read from the shapes of the call (T tokens of S sequences; decode when T == S), so a captured
decode graph holds the kernel of its batch size and nothing is decided on the host. The name is the op's
`backend` argument in the graph, as a single backend's is, and the report shows it.

Planners (FlashInfer's plan()) are made per member backend over every layer that may run it, and plan only
the steps a rule gives that member (`planners_for`): a layer whose decode steps run Triton costs FlashInfer's
planning nothing on those steps.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from custom_ops.attention.backends import AttentionBackend, AttentionPlanner, StepAttentionMetadata, decode_shaped


@dataclass(frozen=True)
class PhaseRule:
    phase: str  # "decode" or "prefill"
    max_batch: int | None  # decode only: steps of at most this many sequences; None: any
    backend: str

    def __str__(self) -> str:
        return f"{self.phase}{f'<={self.max_batch}' if self.max_batch is not None else ''}:{self.backend}"

    def matches(self, decode: bool, num_seqs: int) -> bool:
        if self.phase != ("decode" if decode else "prefill"):
            return False
        return self.max_batch is None or num_seqs <= self.max_batch


def is_phased(name: str) -> bool:
    return ":" in name


def parse_rules(name: str) -> tuple[PhaseRule, ...]:
    """The rules of a phased backend name; a ValueError that quotes the name for a malformed one."""
    rules = []
    for part in name.split(","):
        head, sep, backend = part.strip().partition(":")
        phase, _, limit = head.partition("<=")
        if not sep or not backend or phase not in ("decode", "prefill") or (limit and phase != "decode"):
            raise ValueError(
                f"attention backend {name!r}: rule {part!r} is not 'decode:NAME', 'decode<=N:NAME' or 'prefill:NAME'"
            )
        if limit and not limit.isdigit():
            raise ValueError(f"attention backend {name!r}: rule {part!r} needs a whole number after '<='")
        rules.append(PhaseRule(phase, int(limit) if limit else None, backend))
    for phase in ("decode", "prefill"):
        if not any(rule.phase == phase and rule.max_batch is None for rule in rules):
            raise ValueError(f"attention backend {name!r}: no rule for every {phase} step (add '{phase}:NAME')")
    return tuple(rules)


def phased_name(rules: list[PhaseRule]) -> str:
    """The backend name of `rules`: a single backend's own name where every rule names it."""
    backends = {rule.backend for rule in rules}
    return backends.pop() if len(backends) == 1 else ",".join(str(rule) for rule in rules)


def members(name: str) -> list[str]:
    """The single backends a (phased or single) backend name runs."""
    return list(dict.fromkeys(rule.backend for rule in parse_rules(name))) if is_phased(name) else [name]


@functools.cache
def phased_backend(name: str) -> AttentionBackend:
    """The AttentionBackend a phased name stands for (made once per name)."""
    from custom_ops.attention.backends import get_attention_backend

    rules = parse_rules(name)
    backends = {rule.backend: get_attention_backend(rule.backend) for rule in rules}

    def run(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens, *layer) -> None:
        rule = rule_for(rules, decode_shaped(q.shape[0], seq_lens.shape[0]), seq_lens.shape[0])
        backends[rule.backend].run(out, q, k, v, kv_cache, slot_mapping, block_table, query_start_loc, seq_lens, *layer)

    def unsupported(features) -> str | None:
        return next((f"{n}: {why}" for n, b in backends.items() if (why := b.unsupported(features))), None)

    devices = tuple(d for d in ("cpu", "cuda") if all(d in b.devices for b in backends.values()))
    # Only decode steps replay CUDA graphs (runtime/cuda_graphs.py): the prefill backend need not be capturable.
    graph_safe = all(backends[rule.backend].cuda_graph_safe for rule in rules if rule.phase == "decode")
    return AttentionBackend(name, run, devices, unsupported, make_planner=None, cuda_graph_safe=graph_safe)


def rule_for(rules: tuple[PhaseRule, ...], decode: bool, num_seqs: int) -> PhaseRule:
    """The first rule that matches a step (parse_rules makes sure one does)."""
    return next(rule for rule in rules if rule.matches(decode, num_seqs))


class PhasePlanner:
    """A member backend's planner that plans only the steps where some phased name's rules run that member."""

    def __init__(self, planner: AttentionPlanner, member: str, names: set[str]):
        self.planner, self.member = planner, member
        self.rule_lists = [parse_rules(name) for name in sorted(names)]

    def __getattr__(self, name: str):  # the backend's run reads its own planner's state through this one
        return getattr(self.planner, name)

    def plan(self, metadata: StepAttentionMetadata, cuda_graph_key: Hashable | None = None) -> None:
        num_seqs = len(metadata.seq_lens)
        decode = decode_shaped(int(metadata.query_start_loc[-1]), num_seqs)
        if any(rule_for(rules, decode, num_seqs).backend == self.member for rules in self.rule_lists):
            self.planner.plan(metadata, cuda_graph_key)


def planners_for(layers, block_size: int, device: torch.device) -> dict[str, AttentionPlanner]:
    """The planners a step must run for `layers` (insert_paged_attention's PagedLayer list), by member backend:
    each over the layers that may run it; one that only phased names run plans only the steps they give it."""
    from custom_ops.attention.backends import get_attention_backend

    owned: dict[str, dict] = {}
    phased_names: dict[str, set[str] | None] = {}  # member -> the phased names that run it; None: every step
    for layer in layers:
        for member in members(layer.backend):
            owned.setdefault(member, {})[layer.layer_idx] = layer.features
            if not is_phased(layer.backend) or phased_names.get(member, set()) is None:
                phased_names[member] = None
            else:
                phased_names.setdefault(member, set()).add(layer.backend)
    planners = {}
    for member, layer_features in owned.items():
        make_planner = get_attention_backend(member).make_planner
        if make_planner is not None:
            planner = make_planner(layer_features, block_size, device)
            names = phased_names[member]
            planners[member] = planner if names is None else PhasePlanner(planner, member, names)
    return planners
