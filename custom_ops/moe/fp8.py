"""`compiled_llm::moe_experts_fp8`: `moe_experts` with each expert's weights in float8 e4m3 (W8A8), as
`compiled_llm::fp8_linear` defines FP8 for a linear (custom_ops/linear/fp8.py):

- weights once, per expert and output channel: w13 [E, 2I, H] e4m3 with scales [E, 2I], w2 [E, H, I] with [E, H],
  contiguous, in the logical [E, N, K] layout whatever the model stores (`quantize_experts`);
- activations per call, per row: each token's x before the gate_up GEMM, each pair's activation before the down GEMM;
- each GEMM's sums in float32 times the row's and the channel's scales, then the model's dtype; biases, the gated
  activation, the routing weights and the sum over experts as in `moe_experts`.

Backends: `torch`, the reference (a loop over the experts that have tokens, on the host); `triton`, the grouped GEMMs
of triton_moe.py on e4m3 tensor cores (compute capability 8.9+).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from custom_ops.linear.fp8 import (
    FP8,
    fp8_linear_quantized_reference,
    fp8_tensor_cores,
    quantize_rows,
    quantize_weight,
)
from custom_ops.moe import triton_moe
from custom_ops.moe.op import (
    ACTIVATIONS,
    add_bias,
    local_experts,
    refuse_cuda_graph_capture,
    register_experts_op,
    triton_takes,
)

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "moe_experts_fp8(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w13_scale, Tensor w2, "
    "Tensor w2_scale, Tensor? b13, Tensor? b2, str activation, float[] activation_params, str backend) -> Tensor"
)


def quantize_experts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [E, N, K] e4m3 contiguous, scales [E, N] float32) of expert weights [E, N, K] (any strides)."""
    experts, n, k = weight.shape
    weight8, scale = quantize_weight(weight.detach().reshape(experts * n, k))
    return weight8.view(experts, n, k), scale.view(experts, n)


def moe_experts_fp8_reference(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, b13, b2, activation: str,
                              params: Sequence[float] = ()) -> torch.Tensor:  # fmt: skip
    refuse_cuda_graph_capture(x)
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    flat_ids, flat_weights = topk_ids.reshape(-1), topk_weights.reshape(-1)
    x8, x_scale = quantize_rows(x)
    weighted = x.new_zeros(tokens * top_k, hidden, dtype=torch.promote_types(x.dtype, topk_weights.dtype))
    for expert in local_experts(flat_ids, w13.shape[0]):
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        rows = pairs // top_k
        h = fp8_linear_quantized_reference(x8[rows], x_scale[rows], w13[expert], w13_scale[expert], None, x.dtype)
        act8, act_scale = quantize_rows(ACTIVATIONS[activation](add_bias(h, b13, expert), params))
        y = fp8_linear_quantized_reference(act8, act_scale, w2[expert], w2_scale[expert], None, x.dtype)
        y = add_bias(y, b2, expert)
        weighted[pairs] = y * flat_weights[pairs, None]
    return weighted.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def _triton_moe_fp8(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, b13, b2, activation, params):
    tensor_cores = not x.is_cuda or fp8_tensor_cores(x.device.index)  # e4m3 dots: compute capability 8.9+
    takes = (
        tensor_cores
        and triton_takes(x, topk_ids, b13, b2, activation)
        and all(
            w.dtype == FP8 and w.is_contiguous() and s.dtype == torch.float32
            for w, s in ((w13, w13_scale), (w2, w2_scale))
        )
    )
    if not takes:
        return moe_experts_fp8_reference(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, b13, b2, activation,
                                         params)  # fmt: skip
    return triton_moe.fused_moe(x, topk_ids, topk_weights, w13, w2, b13, b2, activation, params,
                                weight_scales=(w13_scale, w2_scale))  # fmt: skip


MOE_FP8_BACKENDS = {"torch": moe_experts_fp8_reference, "triton": _triton_moe_fp8}


register_experts_op(_LIBRARY, "moe_experts_fp8", MOE_FP8_BACKENDS)
