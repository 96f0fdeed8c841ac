"""Which kernel a `*_backend` field of CompileConfig (`auto|triton|torch`) gives the ops a pass inserts."""

from __future__ import annotations

from custom_ops.triton_runtime import triton_available


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
