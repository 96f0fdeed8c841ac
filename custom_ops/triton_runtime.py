"""Whether our Triton kernels can run: triton installed, and a tensor they can read (on CUDA, or anywhere
under TRITON_INTERPRET=1, whose interpreter runs them on CPU tensors: the CPU tests). Both are asked on
every call of an op, so both are answered once."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # triton reads it at import too


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(tensor: torch.Tensor) -> bool:
    return (tensor.is_cuda or _INTERPRETER) and triton_available()
