"""Registry of paged-attention backends, the rule that picks one per layer, and the per-step plan scope.

A backend is a function with the signature of `compiled_llm::paged_attention` (minus `backend`), the
devices it runs on, a check that says which layer features it cannot handle, and optionally a planner:
host-side work done once per engine step, before the graph runs (FlashInfer's `plan()`), never inside
it. The choice is made once, at compile time, by `insert_paged_attention`, and written into the graph
as the op's `backend` argument, so the compile report and the graph itself say what runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch

# Preference order for `attention_backend="auto"`: fastest first; `reference` always works.
AUTO_ORDER = ("flashinfer", "triton", "sdpa", "reference")


@dataclass(frozen=True)
class LayerAttentionFeatures:
    """What a layer's attention needs from a backend."""

    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    scale: float
    sliding_window: int
    softcap: float
    has_sinks: bool
    dtype: torch.dtype  # of queries, keys and values
    cache_dtype: torch.dtype  # of the paged KV cache: `dtype`, or float8_e4m3fn (see CompileConfig.kv_cache_dtype)
    values_in_keys: bool = False  # v is k (multi-head latent attention, absorbed): the cache holds one plane, keys


@dataclass
class StepAttentionMetadata:
    """Host (CPU) copies of the step's attention inputs, for planners; see paged.py."""

    block_table: torch.Tensor  # [S, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_size: int
    max_blocks_per_seq: int  # capacity: the widest block table any step can have
    is_decode: bool  # every sequence computes exactly one token


def decode_shaped(num_tokens: int, num_seqs: int) -> bool:
    """Whether a step is a decode step as a backend's run sees it, from shapes alone: as many tokens as sequences. Not
    `is_decode` (one token each): a sequence may have no new token (paged.py), so a backend that reads token s as
    sequence s's checks (triton's kernel searches, xqa defers to it), and a planner that picks by phase decides the
    same way its run does (phased.py)."""
    return num_tokens == num_seqs


class AttentionPlanner(Protocol):
    def plan(self, metadata: StepAttentionMetadata, cuda_graph_key: Hashable | None = None) -> None:
        """Prepare the step. `cuda_graph_key` names the captured CUDA graph that will run it: the planner
        keeps fixed buffers per key (those the graph was captured with) and fills them in place."""


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    run: Callable[..., None]  # writes the layer's K/V into the cache, then fills `out`
    devices: tuple[str, ...]  # device types it runs on ("cpu", "cuda")
    unsupported: Callable[[LayerAttentionFeatures], str | None] = lambda features: None
    """Returns why the backend cannot run a layer with these features, or None if it can."""
    make_planner: Callable[[dict[int, LayerAttentionFeatures], int, torch.device], AttentionPlanner] | None = None
    """(layers by index, block_size, device) -> planner; None for backends that need no planning."""
    cuda_graph_safe: bool = False  # no host sync or allocation that depends on the step inside `run`


_BACKENDS: dict[str, AttentionBackend] = {}


def register_attention_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def registered_attention_backend(name: str) -> AttentionBackend | None:
    """The backend registered under `name`, or None."""
    return _BACKENDS.get(name)


def get_attention_backend(name: str) -> AttentionBackend:
    """A registered backend, or the phased one a name of rules stands for (phased.py)."""
    if name in _BACKENDS:
        return _BACKENDS[name]
    if ":" in name:
        from custom_ops.attention.phased import phased_backend

        return phased_backend(name)
    raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}")


def select_attention_backend(requested: str, device_type: str, features: LayerAttentionFeatures) -> tuple[str, str]:
    """Pick the backend for one layer: returns (name, why). Raises if `requested` cannot run it."""
    if requested != "auto":
        backend = get_attention_backend(requested) if ":" in requested else _BACKENDS.get(requested)  # phased.py
        if backend is None:
            raise ValueError(
                f"attention_backend={requested!r} is not available in this version; "
                f"available: {sorted(_BACKENDS)} (or 'auto')"
            )
        if device_type not in backend.devices:
            raise ValueError(
                f"attention_backend={requested!r} runs on {list(backend.devices)}, but the model is on "
                f"{device_type!r}; use attention_backend='auto' or 'reference'"
            )
        reason = backend.unsupported(features)
        if reason:
            raise ValueError(f"attention_backend={requested!r} cannot run this layer: {reason}")
        return requested, "requested"

    skipped = []
    for name in AUTO_ORDER:
        backend = _BACKENDS.get(name)
        if backend is None:
            skipped.append(f"{name}: not in this version")
        elif device_type not in backend.devices:
            skipped.append(f"{name}: no {device_type} support")
        elif reason := backend.unsupported(features):
            skipped.append(f"{name}: {reason}")
        else:
            return name, "auto" + (f"; {'; '.join(skipped)}" if skipped else "")
    raise ValueError(f"no attention backend can run this layer on {device_type}: {'; '.join(skipped)}")


_ACTIVE_PLANNERS: ContextVar[dict[str, AttentionPlanner]] = ContextVar("compiled_llm_attention_planners", default={})


@contextlib.contextmanager
def planned_step(planners: dict[str, AttentionPlanner]) -> Iterator[None]:
    """Within the block, paged-attention backends find the planners the runner planned for this step."""
    token = _ACTIVE_PLANNERS.set(planners)
    try:
        yield
    finally:
        _ACTIVE_PLANNERS.reset(token)


def planner_in_scope(backend: str) -> AttentionPlanner | None:
    """The planner `planned_step` put in scope for `backend`, if any."""
    return _ACTIVE_PLANNERS.get().get(backend)


def active_planner(backend: str) -> AttentionPlanner:
    planner = planner_in_scope(backend)
    if planner is None:
        raise RuntimeError(
            f"paged_attention(backend={backend!r}) ran outside a planned step: run the graph through "
            "ModelRunner, which plans each step before running it"
        )
    return planner
