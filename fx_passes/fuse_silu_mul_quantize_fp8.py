"""fuse_silu_mul_quantize_fp8: a gated MLP's activation read only by an FP8 down projection writes its input.

    gate, up = split(gate_up, [I, I], -1); a = silu(gate) * up
    y = compiled_llm.fp8_linear(a, W8, s_w, None, b, backend)
    ->
    a8, s_a = compiled_llm.silu_mul_fp8(gate_up, backend')
    y = compiled_llm.fp8_linear_quantized(a8, s_a, W8, s_w, b, dtype, backend)

Exact against eager: the fused op rounds as the activation (silu, then the product, each in the model's dtype) and
the linear's per-token quantization do (custom_ops/linear/silu_mul_fp8.py); Inductor, fusing the unfused pair, may
skip the silu's rounding, so compiled graphs can differ in a last bit. With the down projection on the `triton`
backend: one kernel instead of Inductor's activation kernel and the linear's quantizing kernel; on `torch` (a CPU,
the reference) the same rewrite, checked there; not on `scaled_mm` (a GPU kept to torch's ops), where the fused op
would be torch's ops that Inductor can no longer fuse. After quantize_fp8 (dynamic activation scales only) and
fuse_parallel_linears (gate and up one linear), before the Inductor compile.
"""

from __future__ import annotations

import torch
import torch.fx

import custom_ops.linear  # noqa: F401  (registers the ops)
from fx_passes.node_match import only_user
from fx_passes.quantizing_producers import fuse_gates
from fx_passes.registry import PassResult, register_pass

ops = torch.ops.compiled_llm


def _down_projection(product: torch.fx.Node) -> torch.fx.Node | None:
    """The fp8_linear with dynamic activation scales that is the only reader of `product`, if there is one."""
    linear = only_user(product)
    fits = linear is not None and linear.target is ops.fp8_linear.default and linear.args[0] is product
    return linear if fits and linear.args[3] is None else None


@register_pass("fuse_silu_mul_quantize_fp8")
def fuse_silu_mul_quantize_fp8(gm: torch.fx.GraphModule, config) -> PassResult:
    sites = fuse_gates(gm.graph, _down_projection, ops.silu_mul_fp8.default, ops.fp8_linear_quantized.default,
                       "scaled_mm")  # fmt: skip
    return PassResult("fuse_silu_mul_quantize_fp8", sites, f"{sites} SiLU gates write FP8 activations" if sites else "")
