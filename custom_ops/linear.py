"""`compiled_llm::linear`: y = x @ W^T (+ b), with the kernel chosen per call by a named backend;
`compiled_llm::linear_silu_mul`: the same with a gated MLP's activation after it (W = [gate; up]).

The seam for linear kernels: the `insert_linear_op` pass routes the graph's linears here, and each backend
decides per call, from the shapes it gets, which kernel runs. `torch` is the reference (F.linear: cuBLAS
or the CPU BLAS); `triton` runs the GEMV of `triton_gemv.py` for one-token calls on shapes where it beats
cuBLAS (measured in BENCHMARKS.md) and F.linear otherwise. Quantized linears are further backends.

The op is registered with `torch.library.Library` directly, not `custom_op`: a step that is not replayed
from a CUDA graph calls it once per linear, and custom_op's Python wrapper costs more than a small GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from custom_ops.triton_gemv import launch_gemv
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_runs_on
from custom_ops.triton_silu_mul import triton_silu_mul

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define("linear(Tensor x, Tensor weight, Tensor? bias, str backend) -> Tensor")
# A gated MLP's gate/up projection and activation: silu(x @ gate^T) * (x @ up^T) with weight = [gate; up].
_LIBRARY.define("linear_silu_mul(Tensor x, Tensor weight, Tensor? bias, str backend) -> Tensor")


def gemv_is_faster(n: int, k: int) -> bool:
    """Whether the one-row GEMV beats cuBLAS for weight [n, k] (H100 measurements, BENCHMARKS.md): it
    does for every decoder linear; for a wide LM head over a narrow hidden size cuBLAS is faster."""
    return k >= 1024 or n <= 16384


def runs_other_than_torch(backend: str, n: int, k: int) -> bool:
    """Whether `backend` ever runs something other than F.linear for a weight [n, k]. Where it does not,
    `insert_linear_op` leaves the aten op, which Inductor calls without Python in between."""
    return backend == "triton" and gemv_is_faster(n, k)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """One row, on the device, in the layouts and dtypes the kernel takes (anything else: cuBLAS, which
    also raises F.linear's errors for bad shapes): `gemv`'s checks, so the op launches it without them."""
    k = x.shape[-1]
    # Cheapest test first: most calls outside CUDA graphs have many rows and go straight to cuBLAS.
    if k == 0 or x.numel() != k or x.stride(-1) != 1:
        return False
    return (
        triton_runs_on(x) and x.dtype in KERNEL_DTYPES and weight.is_contiguous() and weight.dtype == x.dtype
        and weight.shape[1] == k
        and (bias is None or (bias.is_contiguous() and bias.shape == (weight.shape[0],) and bias.dtype == x.dtype))
        and gemv_is_faster(*weight.shape)
    )  # fmt: skip


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _takes_gemv(x, weight, bias):
        return launch_gemv(x.reshape(1, -1), weight, None, bias, False).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _torch_linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return silu_and_mul(F.linear(x, weight, bias))


def _triton_linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out_shape = (*x.shape[:-1], weight.shape[0] // 2)
    halves = weight.shape[0] % 2 == 0  # else F.linear and silu_and_mul raise the shape error
    if halves and _takes_gemv(x, weight, bias):
        return launch_gemv(x.reshape(1, -1), weight, None, bias, True).view(out_shape)
    gate_up = F.linear(x, weight, bias)
    if not (halves and triton_runs_on(gate_up) and gate_up.dtype in KERNEL_DTYPES):
        return silu_and_mul(gate_up)
    return triton_silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(out_shape)


LINEAR_BACKENDS: dict[str, LinearFn] = {"torch": F.linear, "triton": _triton_linear}
LINEAR_SILU_MUL_BACKENDS: dict[str, LinearFn] = {"torch": _torch_linear_silu_mul, "triton": _triton_linear_silu_mul}


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return LINEAR_BACKENDS[backend](x, weight, bias)


def _linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return LINEAR_SILU_MUL_BACKENDS[backend](x, weight, bias)


def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_silu_mul_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("linear", _linear, _device)
    _LIBRARY.impl("linear_silu_mul", _linear_silu_mul, _device)
torch.library.register_fake("compiled_llm::linear", _linear_fake, lib=_LIBRARY)
torch.library.register_fake("compiled_llm::linear_silu_mul", _linear_silu_mul_fake, lib=_LIBRARY)
