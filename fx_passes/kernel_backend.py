"""Which kernel a `*_backend` field of CompileConfig (`auto|triton|torch`, `onednn` for linears) gives the
ops a pass inserts."""

from __future__ import annotations

import platform

from custom_ops.linear import onednn_unavailable
from custom_ops.triton_runtime import triton_available

# Where `auto` takes oneDNN for a CPU model's linears: the machines it was measured faster on (BENCHMARKS.md).
ONEDNN_MEASURED_MACHINES = ("x86_64", "AMD64")


def resolve_triton_backend(field: str, requested: str, device_type: str) -> tuple[str, str]:
    """(backend, why): `auto` is `triton` for a CUDA model with triton installed, else `torch`; an explicit
    `triton` needs triton installed (on CPU it runs the torch code, except under TRITON_INTERPRET=1)."""
    installed = triton_available()
    if requested == "auto":
        if device_type == "cuda" and installed:
            return "triton", "auto: CUDA model, triton installed"
        return "torch", "auto: " + ("not a CUDA model" if device_type != "cuda" else "triton is not installed")
    if requested == "triton" and not installed:
        raise ValueError(f"{field}='triton' needs triton (pip install compiled-llm[gpu]); allowed without it: auto, torch")
    return requested, "requested"


def resolve_linear_backend(requested: str, device_type: str) -> tuple[str, str]:
    """(backend, why) for `linear_backend`: `auto` is `triton` for a CUDA model (as above) and `onednn` for
    a CPU model on an x86-64 machine whose torch has oneDNN, else `torch`."""
    if requested == "onednn" or (requested == "auto" and device_type == "cpu"):
        reason = f"runs on CPU models, and this one is on {device_type}" if device_type != "cpu" else onednn_unavailable()
        if reason is None and requested == "auto" and platform.machine() not in ONEDNN_MEASURED_MACHINES:
            reason = f"not measured on {platform.machine()} CPUs"
        if reason is None:
            return "onednn", "requested" if requested == "onednn" else "auto: CPU model, oneDNN available"
        if requested == "onednn":
            raise ValueError(f"linear_backend='onednn' {reason}; allowed: auto, torch" + (", triton" if device_type == "cuda" else ""))
        return "torch", f"auto: {reason}"
    return resolve_triton_backend("linear_backend", requested, device_type)
