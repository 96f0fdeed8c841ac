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
from fx_passes.fuse_linear_silu_mul import gated_activation_input
from fx_passes.fuse_norm_quantize_int8 import read_int8_rows
from fx_passes.fuse_silu_mul_quantize_fp8 import erase_unused
from fx_passes.node_match import calls, only_user
from fx_passes.node_meta import insert_call, insert_outputs
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
    graph = gm.graph
    sites = 0
    for product in calls(graph, torch.ops.aten.mul.Tensor):
        gate_up = gated_activation_input(product)
        linear = _down_projection(product) if gate_up is not None else None
        if linear is None or linear.args[5] == "int_mm":  # see the module docstring
            continue
        dtype = product.meta["val"].dtype
        if gate_up.meta["val"].dtype != dtype:  # the fused op rounds to gate_up's dtype
            continue
        smooth = linear.args[3]  # a buffer's read, which quantize_int8 put before the linear
        with graph.inserting_before(linear):
            kernel = "triton" if linear.args[5] == "triton" else "torch"
            args = (gate_up, smooth, kernel)
            a8, scale = insert_outputs(graph, insert_call(graph, ops.silu_mul_int8.default, args))
        read_int8_rows(graph, linear, a8, scale, dtype)
        erase_unused(graph, product, keep=gate_up)
        sites += 1
    return PassResult(
        "fuse_silu_mul_quantize_int8", sites, f"{sites} SiLU gates write int8 activations" if sites else ""
    )
