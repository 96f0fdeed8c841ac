"""`compiled_llm::moe_experts`: a mixture-of-experts layer's experts, after its router picked them.

    out[t] = sum_j  w[t, j] * down_e(act(gate_up_e(x[t])))     with e = ids[t, j], j < top_k

x [T, H]; ids [T, k] (int); w [T, k] (the router's weights, any float dtype); w13 [E, 2I, H] (each expert's
gate rows then up rows, as `nn.Linear` weights; any strides); w2 [E, H, I]; optional biases b13 [E, 2I] and b2
[E, H]. An id outside [0, E) selects no expert: its pair adds zero (expert parallelism marks so the pairs routed to
another rank's experts, fx_passes/shard_experts.py). `activation` names the gated activation of a [gate | up] row, with its float parameters: "silu" (silu(gate) *
up, SwiGLU; none), "swiglu_oai" (GPT-OSS's clamped SwiGLU over interleaved rows; alpha, limit).

Numerics, which every backend is held to (tests/test_moe_experts.py), transformers' `grouped_mm` experts: each
expert's projections in x's dtype (rounded after each op: the product, the bias add, each op of the activation), the
routing weight's product in the promoted dtype of the two, the sum over the k experts of a token accumulated in
float32 and rounded once to x's dtype.

Backends by name: `torch` is the reference (a loop over the experts that have tokens; it reads the routing on the
host, so it cannot run inside a CUDA-graph capture); `triton` runs triton_moe.py's grouped GEMMs, which read only
the weights of experts that have tokens and never leave the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from custom_ops.moe import triton_moe
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_runs_on


def _silu_mul(gate_up: torch.Tensor, params: Sequence[float]) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_oai(gate_up: torch.Tensor, params: Sequence[float]) -> torch.Tensor:
    """GPT-OSS's: interleaved [g0, u0, g1, u1, ...] rows, the gate clamped above and the up both ways at `limit`,
    gate * sigmoid(alpha * gate) * (up + 1)."""
    alpha, limit = params
    gate = gate_up[..., ::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# A gated activation of [gate | up] rows (with its float parameters), by the name the op takes.
ACTIVATIONS: dict[str, Callable[[torch.Tensor, Sequence[float]], torch.Tensor]] = {
    "silu": _silu_mul,
    "swiglu_oai": _swiglu_oai,
}

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "moe_experts(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w2, Tensor? b13, Tensor? b2, "
    "str activation, float[] activation_params, str backend) -> Tensor"
)


def add_bias(h: torch.Tensor, bias: torch.Tensor | None, expert: int) -> torch.Tensor:
    """h + bias[expert] as transformers' grouped GEMMs add it (in place, after the product): in float32, rounded once
    to h's dtype, whatever the bias's."""
    return h if bias is None else (h.float() + bias[expert].float()).to(h.dtype)


def refuse_cuda_graph_capture(x: torch.Tensor) -> None:
    """The reference reads the routing on the host: inside a CUDA-graph capture, an error that says what to change
    (rather than CUDA's own, which names neither the op nor the setting)."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "compiled_llm::moe_experts with backend 'torch' reads the routing on the host, which a CUDA-graph capture "
            "cannot hold: use moe_backend='auto' or 'triton' (or cuda_graphs=False)"
        )


def local_experts(flat_ids: torch.Tensor, num_experts: int) -> list[int]:
    """The experts in [0, num_experts) that `flat_ids` picks (another rank's, outside it, add zero)."""
    return [expert for expert in flat_ids.unique().tolist() if 0 <= expert < num_experts]


def moe_experts_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                          w2: torch.Tensor, b13: torch.Tensor | None, b2: torch.Tensor | None,
                          activation: str, params: Sequence[float] = ()) -> torch.Tensor:  # fmt: skip
    refuse_cuda_graph_capture(x)
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    flat_ids, flat_weights = topk_ids.reshape(-1), topk_weights.reshape(-1)
    weighted = x.new_zeros(tokens * top_k, hidden, dtype=torch.promote_types(x.dtype, topk_weights.dtype))
    for expert in local_experts(flat_ids, w13.shape[0]):
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        h = add_bias(F.linear(x[pairs // top_k], w13[expert]), b13, expert)
        y = add_bias(F.linear(ACTIVATIONS[activation](h, params), w2[expert]), b2, expert)
        weighted[pairs] = y * flat_weights[pairs, None]
    return weighted.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def triton_takes(x: torch.Tensor, topk_ids: torch.Tensor, b13: torch.Tensor | None, b2: torch.Tensor | None,
                 activation: str) -> bool:  # fmt: skip
    """Whether triton_moe's kernels read these: rows with a unit last stride in a dtype they compute, integer ids,
    biases in a float dtype (any strides), an activation they know (the weights: each op's own check)."""
    return (
        triton_runs_on(x) and x.dtype in KERNEL_DTYPES and x.stride(-1) == 1 and activation in triton_moe.ACTIVATIONS
        and not topk_ids.is_floating_point() and all(b is None or b.dtype in KERNEL_DTYPES for b in (b13, b2))
    )  # fmt: skip


def _triton_moe(x, topk_ids, topk_weights, w13, w2, b13, b2, activation: str, params: Sequence[float]) -> torch.Tensor:
    if not (triton_takes(x, topk_ids, b13, b2, activation) and w13.dtype == x.dtype == w2.dtype):
        return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, b13, b2, activation, params)
    return triton_moe.fused_moe(x, topk_ids, topk_weights, w13, w2, b13, b2, activation, params)


MOE_BACKENDS = {"torch": moe_experts_reference, "triton": _triton_moe}


def experts_ops() -> tuple:
    """The experts ops, one per weight format (this module's, fp8.py's, mxfp4.py's): their first three arguments (x,
    ids, weights) and their last (the backend) alike."""
    return tuple(getattr(torch.ops.compiled_llm, name).default for name in ("moe_experts", "moe_experts_fp8",
                                                                           "moe_experts_mxfp4"))  # fmt: skip


def register_experts_op(library: torch.library.Library, name: str, backends: dict[str, Callable]) -> None:
    """Implement `compiled_llm::<name>`, an experts op defined on `library` whose last argument names its backend, by
    `backends` (name -> the op's function without that argument), on CPU and CUDA; its fake is a tensor like x."""

    def run(*args):
        *args, backend = args
        return backends[backend](*args)

    def fake(x, *args):
        return x.new_empty(x.shape)

    for device in ("CPU", "CUDA"):
        library.impl(name, run, device)
    torch.library.register_fake(f"compiled_llm::{name}", fake, lib=library)


register_experts_op(_LIBRARY, "moe_experts", MOE_BACKENDS)
