"""Whether our Triton kernels can run: triton installed, and a tensor they can read (on CUDA, or anywhere
under TRITON_INTERPRET=1, whose interpreter runs them on CPU tensors: the CPU tests). Both are asked on
every call of an op, so both are answered once.

`pdl_launch_options`: whether our kernels use programmatic dependent launch on this tensor's GPU (Hopper
and later). Each of them then starts while the kernel before it finishes, loads what does not depend on
it (a GEMV's weights, a norm's weight), and waits (`gdc_wait`) before reading anything the
previous kernel may have written; `gdc_launch_dependents` at its start lets the next one do the same.
At batch-1 decode a layer is ten kernels of a few microseconds, so the gap between two is a real share
of the step. `COMPILED_LLM_DISABLE_PDL=1` (read at import) turns it off (to measure it, or to rule it out).

The rule every kernel launched this way keeps: each program runs `gdc_wait` before any store, any
early return, and any load of something a kernel writes (only the model's parameters are read before).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # triton reads it at import too
_PDL_DISABLED = os.environ.get("COMPILED_LLM_DISABLE_PDL") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(tensor: torch.Tensor) -> bool:
    return (tensor.is_cuda or _INTERPRETER) and triton_available()


def runs_ptx(tensor: torch.Tensor) -> bool:
    """Whether a kernel over `tensor` may hold inline PTX: on an NVIDIA GPU (not ROCm's), where the interpreter runs
    none."""
    return tensor.is_cuda and torch.version.hip is None and not _INTERPRETER


# What our kernels take: they compute in float32, so float64 stays with torch.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def _why_no_pdl(device: torch.device) -> str | None:
    """None where our kernels launch with PDL on `device`, else why not."""
    if device.type != "cuda" or _INTERPRETER:
        return "not a CUDA device"
    if _PDL_DISABLED:
        return "COMPILED_LLM_DISABLE_PDL=1"
    if not _has_pdl(device.index or 0):
        return "programmatic dependent launch needs an NVIDIA GPU of compute capability 9.0+"
    return None


def kernel_launch_mode(device: torch.device) -> str:
    """How our Triton kernels launch on `device`, and why, for the compile report ("" off CUDA)."""
    if device.type != "cuda":
        return ""
    if not triton_available():
        return "none (triton is not installed)"
    why = _why_no_pdl(device)
    return f"plain launches ({why})" if why else "programmatic dependent launch (each kernel loads its weights while the previous one drains)"


# Whether the fused FP8 producers (add_rms_norm_fp8, silu_mul_fp8) let the next kernel launch after their stores
# rather than at their start, as every kernel here does. Under PDL an early trigger chains: the GEMM after a producer
# launched at a GEMM's start is placed on the SMs the running GEMM leaves free, and may wait there for all of it (the
# fusions lose 6.5% under PDL and gain 1.5% without, BENCHMARKS.md); True is the experiment that tells.
FUSED_PRODUCERS_TRIGGER_LATE = False

_PLAIN, _PDL = {"USE_PDL": False}, {"USE_PDL": True, "launch_pdl": True}


def pdl_launch_options(tensor: torch.Tensor) -> dict:
    """Launch keywords for a kernel with a USE_PDL constexpr that reads `tensor` (Triton's `launch_pdl`
    sets the launch attribute)."""
    return _PDL if _why_no_pdl(tensor.device) is None else _PLAIN
