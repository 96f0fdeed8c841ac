"""`compiled_llm::linear`: y = x @ W^T (+ b), with the kernel chosen per call by a named backend;
`compiled_llm::linear_silu_mul`: the same with a gated MLP's activation after it (W = [gate; up]).

The seam for linear kernels: the `insert_linear_op` pass routes the graph's linears here, and each backend
decides per call, from the shapes it gets, which kernel runs. `torch` is the reference (F.linear: cuBLAS
or the CPU BLAS); `triton` runs the GEMV of `triton_gemv.py` for one-token calls on shapes where it beats
cuBLAS (measured in BENCHMARKS.md), the tensor-core decode GEMM of `triton_decode_gemm.py` at 2 to 64 rows where
the autotuner measured it faster (TUNED_ROWS), and F.linear otherwise; `onednn` runs float32 linears on a CPU through
oneDNN's matmul (`mkldnn._linear_pointwise` over the plain weight: no packed copy), 1.2-2.4x faster than
MKL's on the weight shapes `onednn_is_faster` names (BENCHMARKS.md). Inductor only calls that op on
weights it froze into constants, hence the op around it. Quantized linears are further backends.

The op is registered with `torch.library.Library` directly, not `custom_op`: a step that is not replayed
from a CUDA graph calls it once per linear, and custom_op's Python wrapper costs more than a small GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from custom_ops.linear.triton_decode_gemm import MAX_ROWS as DECODE_ROWS
from custom_ops.linear.triton_decode_gemm import decode_gemm, m_padded
from custom_ops.linear.triton_gemv import launch_gemv
from custom_ops.linear.triton_silu_mul import triton_silu_mul
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_runs_on

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define("linear(Tensor x, Tensor weight, Tensor? bias, str backend) -> Tensor")
# A gated MLP's gate/up projection and activation: silu(x @ gate^T) * (x @ up^T) with weight = [gate; up].
_LIBRARY.define("linear_silu_mul(Tensor x, Tensor weight, Tensor? bias, str backend) -> Tensor")


def gemv_is_faster(n: int, k: int) -> bool:
    """Whether the one-row GEMV beats cuBLAS for weight [n, k] (H100 measurements, BENCHMARKS.md): it
    does for every decoder linear; for a wide LM head over a narrow hidden size cuBLAS is faster."""
    return k >= 1024 or n <= 16384


def onednn_is_faster(n: int, k: int) -> bool:
    """Whether oneDNN's matmul beats F.linear (MKL) for a float32 weight [n, k] on a CPU (measured on 2
    cores, 1 to 128 rows, BENCHMARKS.md): by 1.2-2.4x for weights wider than deep or of 8 MiB and more;
    on smaller square or deep ones (SmolLM2's o and down projections) its ~40 us a call loses."""
    return n > k or n * k * 4 >= 8 << 20


def onednn_unavailable() -> str | None:
    """Why the `onednn` backend cannot run in this torch build, or None."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    return None


def runs_other_than_torch(backend: str, weight: torch.Tensor) -> bool:
    """Whether `backend` ever runs something other than F.linear for `weight` ([n, k]; a fake tensor is
    enough). Where it does not, `insert_linear_op` leaves the aten op, which Inductor calls without Python
    in between."""
    if backend == "triton":
        return gemv_is_faster(*weight.shape)
    if backend == "onednn":
        return weight.dtype == torch.float32 and weight.device.type == "cpu" and onednn_is_faster(*weight.shape)
    return False


def triton_linears(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, bool]]:
    """(weight node, silu_mul) of each `triton` linear of a graph, for the linear tunings: compiled_llm.linear and
    linear_silu_mul."""
    ops = torch.ops.compiled_llm
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.args[-1] != "triton":
            continue
        if node.target in (ops.linear.default, ops.linear_silu_mul.default):
            found.append((node.args[1], node.target is ops.linear_silu_mul.default))
    return found


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# The GEMV choices the autotuner made in this process (autotune.select_kernels; gemv_tuning.py), by (device index
# as Tensor.get_device gives it, N, K, silu_mul): tile overrides for the GEMV, or None for cuBLAS. A shape without
# one: gemv_is_faster, then gemv_config's tile.
TUNED_GEMV: dict[tuple[int, int, int, bool], dict | None] = {}
_UNTUNED = object()


def _gemv_tile(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> dict | None:
    """The GEMV's tile overrides for this call, or None where cuBLAS runs it: more than one row, a layout or dtype
    the kernel does not take (cuBLAS then also raises F.linear's errors for bad shapes), or a shape where cuBLAS is
    the faster. `gemv`'s checks, so the op launches it without them."""
    k = x.shape[-1]
    # Cheapest test first: most calls outside CUDA graphs have many rows and go straight to cuBLAS.
    if k == 0 or x.numel() != k or x.stride(-1) != 1:
        return None
    takes = (
        triton_runs_on(x) and x.dtype in KERNEL_DTYPES and weight.is_contiguous() and weight.dtype == x.dtype
        and weight.shape[1] == k
        and (bias is None or (bias.is_contiguous() and bias.shape == (weight.shape[0],) and bias.dtype == x.dtype))
    )  # fmt: skip
    if not takes:
        return None
    n = weight.shape[0]
    tuned = TUNED_GEMV.get((x.get_device(), n, k, silu_mul), _UNTUNED)
    if tuned is _UNTUNED:
        return {} if gemv_is_faster(n, k) else None
    return tuned


# The autotuner's choices at 2 to 64 rows (decode_gemm_tuning.LinearRowsTuning), by (device index, N, K, rows padded
# to 16, 32 or 64, silu_mul): a tile of the decode GEMM, or None for cuBLAS. Untuned: cuBLAS.
TUNED_ROWS: dict[tuple[int, int, int, int, bool], dict | None] = {}


def _decode_gemm_tile(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> dict | None:
    """The decode GEMM's tile for this call of 2 to 64 rows, or None where cuBLAS runs it (untuned, tuned so, or a
    layout or dtype the kernel does not take)."""
    if not TUNED_ROWS:  # cheapest test first: nothing tuned, cuBLAS
        return None
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not 1 < rows <= DECODE_ROWS:
        return None
    n = weight.shape[0]
    tile = TUNED_ROWS.get((x.get_device(), n, k, m_padded(rows), silu_mul))
    takes = (
        tile is not None and triton_runs_on(x) and x.dtype.itemsize == 2 and x.stride(-1) == 1
        and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape[1] == k and (not silu_mul or n % 2 == 0)
        and (bias is None or (bias.is_contiguous() and bias.shape == (n,) and bias.dtype == x.dtype))
    )  # fmt: skip
    return tile if takes else None


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    tile = _gemv_tile(x, weight, bias, False)
    if tile is not None:
        return launch_gemv(x.reshape(1, -1), weight, None, bias, False, **tile).view(*x.shape[:-1], weight.shape[0])
    tile = _decode_gemm_tile(x, weight, bias, False)
    if tile is not None:
        out = decode_gemm(x.reshape(-1, x.shape[-1]), weight, bias, x.dtype, **tile)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    takes = (
        _HAS_ONEDNN and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and weight.dim() == 2
        and weight.is_contiguous() and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == (weight.shape[0],)))
    )  # fmt: skip
    if not takes:  # oneDNN's float32 path only; F.linear also raises the shape errors, with their usual text
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _torch_linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return silu_and_mul(F.linear(x, weight, bias))


def _triton_linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out_shape = (*x.shape[:-1], weight.shape[0] // 2)
    halves = weight.shape[0] % 2 == 0  # else F.linear and silu_and_mul raise the shape error
    tile = _gemv_tile(x, weight, bias, True) if halves else None
    if tile is not None:
        return launch_gemv(x.reshape(1, -1), weight, None, bias, True, **tile).view(out_shape)
    tile = _decode_gemm_tile(x, weight, bias, True) if halves else None
    if tile is not None:
        return decode_gemm(x.reshape(-1, x.shape[-1]), weight, bias, x.dtype, silu_mul=True, **tile).view(out_shape)
    return cublas_linear_silu_mul(x, weight, bias)


def cublas_linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The `triton` backend's linear_silu_mul where the GEMV does not run it: cuBLAS, then one Triton kernel for
    the activation (F.silu and a product where triton does not run)."""
    gate_up = F.linear(x, weight, bias)
    halves = weight.shape[0] % 2 == 0  # else silu_and_mul raises the shape error
    if not (halves and triton_runs_on(gate_up) and gate_up.dtype in KERNEL_DTYPES):
        return silu_and_mul(gate_up)
    return triton_silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*x.shape[:-1], weight.shape[0] // 2)


LINEAR_BACKENDS: dict[str, LinearFn] = {"torch": F.linear, "triton": _triton_linear, "onednn": _onednn_linear}
LINEAR_SILU_MUL_BACKENDS: dict[str, LinearFn] = {
    "torch": _torch_linear_silu_mul,
    "triton": _triton_linear_silu_mul,
    "onednn": lambda x, weight, bias: silu_and_mul(_onednn_linear(x, weight, bias)),
}
# Where linear_silu_mul runs fewer kernels than the linear and Inductor's own activation kernel after it.
FUSED_SILU_MUL_BACKENDS = ("triton",)


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
