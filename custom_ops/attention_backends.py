"""Registry of paged-attention backends and the rule that picks one per layer.

A backend is a function with the signature of `compiled_llm::paged_attention` (minus `backend`), the
devices it runs on, and a check that says which layer features it cannot handle. The choice is made
once, at compile time, by `insert_paged_attention`, and written into the graph as the op's `backend`
argument, so the compile report and the graph itself say what runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Preference order for `attention_backend="auto"`: fastest first; `reference` always works.
AUTO_ORDER = ("flashinfer", "triton", "reference")


@dataclass(frozen=True)
class LayerAttentionFeatures:
    """What a layer's attention needs from a backend."""

    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    sliding_window: int
    softcap: float
    has_sinks: bool


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    run: Callable[..., None]  # writes the layer's K/V into the cache, then fills `out`
    devices: tuple[str, ...]  # device types it runs on ("cpu", "cuda")
    unsupported: Callable[[LayerAttentionFeatures], str | None] = lambda features: None
    """Returns why the backend cannot run a layer with these features, or None if it can."""


_BACKENDS: dict[str, AttentionBackend] = {}


def register_attention_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def get_attention_backend(name: str) -> AttentionBackend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}") from None


def select_attention_backend(requested: str, device_type: str, features: LayerAttentionFeatures) -> tuple[str, str]:
    """Pick the backend for one layer: returns (name, why). Raises if `requested` cannot run it."""
    if requested != "auto":
        backend = _BACKENDS.get(requested)
        if backend is None:
            raise ValueError(
                f"attention_backend={requested!r} is not available in this installation; "
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
            skipped.append(f"{name}: not installed")
        elif device_type not in backend.devices:
            skipped.append(f"{name}: no {device_type} support")
        elif reason := backend.unsupported(features):
            skipped.append(f"{name}: {reason}")
        else:
            return name, "auto" + (f" ({'; '.join(skipped)})" if skipped else "")
    raise ValueError(f"no attention backend can run this layer on {device_type}: {'; '.join(skipped)}")
