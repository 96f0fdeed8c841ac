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
from fx_passes.fuse_linear_silu_mul import gated_activation_input
from fx_passes.fuse_norm_quantize_fp8 import read_quantized_rows
from fx_passes.node_match import calls, only_user
from fx_passes.node_meta import insert_call, insert_outputs
from fx_passes.registry import PassResult, register_pass

ops = torch.ops.compiled_llm


def _down_projection(product: torch.fx.Node) -> torch.fx.Node | None:
    """The fp8_linear with dynamic activation scales that is the only reader of `product`, if there is one."""
    linear = only_user(product)
    fits = linear is not None and linear.target is ops.fp8_linear.default and linear.args[0] is product
    return linear if fits and linear.args[3] is None else None


def erase_unused(graph: torch.fx.Graph, node: torch.fx.Node, keep: torch.fx.Node) -> None:
    """Erase `node` and the nodes between it and `keep` that fed only it (the split, silu and product)."""
    if node is keep or node.users or node.op != "call_function":
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for source in inputs:
        erase_unused(graph, source, keep)


def fuse_gates(graph: torch.fx.Graph, down_projection_of, quantizing, quantized, kept_backend: str,
               extra_args=lambda linear: ()) -> int:  # fmt: skip
    """Each gated activation silu(gate) * up that only the linear `down_projection_of(product)` accepts reads becomes
    `quantizing` (gate_up, *extra_args(linear), kernel) -> (a8, s_a), and the linear `quantized` over its rows; not
    where the linear's backend is `kept_backend` (see the module docstring). The count. Shared with
    fuse_silu_mul_quantize_int8."""
    sites = 0
    for product in calls(graph, torch.ops.aten.mul.Tensor):
        gate_up = gated_activation_input(product)
        linear = down_projection_of(product) if gate_up is not None else None
        if linear is None or linear.args[5] == kept_backend:
            continue
        dtype = product.meta["val"].dtype
        if gate_up.meta["val"].dtype != dtype:  # the fused op rounds to gate_up's dtype
            continue
        with graph.inserting_before(linear):
            kernel = "triton" if linear.args[5] == "triton" else "torch"
            args = (gate_up, *extra_args(linear), kernel)
            a8, scale = insert_outputs(graph, insert_call(graph, quantizing, args))
        read_quantized_rows(graph, linear, a8, scale, dtype, quantized)
        erase_unused(graph, product, keep=gate_up)
        sites += 1
    return sites


@register_pass("fuse_silu_mul_quantize_fp8")
def fuse_silu_mul_quantize_fp8(gm: torch.fx.GraphModule, config) -> PassResult:
    sites = fuse_gates(gm.graph, _down_projection, ops.silu_mul_fp8.default, ops.fp8_linear_quantized.default,
                       "scaled_mm")  # fmt: skip
    return PassResult("fuse_silu_mul_quantize_fp8", sites, f"{sites} SiLU gates write FP8 activations" if sites else "")
