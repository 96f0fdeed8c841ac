"""fuse_silu_mul_quantize_int8: a gated MLP's activation read only by an int8 down projection (SmoothQuant) writes
its input, the down projection's smooth applied.

    gate, up = split(gate_up, [I, I], -1); a = silu(gate) * up
    y = compiled_llm.int8_linear(a, W8, s_w, smooth, b, backend)
    ->
    a8, s_a = compiled_llm.silu_mul_int8(gate_up, smooth, backend')
    y = compiled_llm.int8_linear_quantized(a8, s_a, W8, s_w, b, dtype, backend)

Exact against eager, as fuse_silu_mul_quantize_fp8 (custom_ops/linear/silu_mul_int8.py rounds as the activation and
the linear's quantization do). With the down projection on the `triton` backend: one kernel instead of Inductor's
activation kernel and the linear's quantizing kernel; on `torch` (a CPU, the reference) the same rewrite, checked
there; not on `int_mm` (a GPU kept to torch's ops). After quantize_int8 and fuse_parallel_linears (gate and up one
linear), before the Inductor compile.
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
    """The int8_linear that is the only reader of `product`, with a smooth read from the graph's buffers (or none)."""
    linear = only_user(product)
    if linear is None or linear.target is not ops.int8_linear.default or linear.args[0] is not product:
        return None
    smooth = linear.args[3]
    return linear if smooth is None or smooth.op == "get_attr" else None


@register_pass("fuse_silu_mul_quantize_int8")
def fuse_silu_mul_quantize_int8(gm: torch.fx.GraphModule, config) -> PassResult:
    # The smooth is a buffer's read, which quantize_int8 put before the linear: before the fused op too.
    sites = fuse_gates(gm.graph, _down_projection, ops.silu_mul_int8.default, ops.int8_linear_quantized.default,
                       "int_mm", lambda linear: (linear.args[3],))  # fmt: skip
    detail = f"{sites} SiLU gates write int8 activations" if sites else ""
    return PassResult("fuse_silu_mul_quantize_int8", sites, detail)
