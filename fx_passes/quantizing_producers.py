"""What the passes that let a producer write a quantized linear's input share (fuse_norm_quantize_fp8 / _int8,
fuse_silu_mul_quantize_fp8 / _int8): the loops over a graph's residual-add RMSNorms and gated activations, each
format giving its readers, its fused op and its extra arguments, and the swap of a linear for its form over rows
quantized already. The passes' modules say what each rewrites and why it is exact."""

from __future__ import annotations

import operator

import torch
import torch.fx

from fx_passes.fuse_linear_silu_mul import gated_activation_input
from fx_passes.node_match import calls
from fx_passes.node_meta import insert_call, insert_outputs

ops = torch.ops.compiled_llm


def norm_outputs(norm: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """add_rms_norm's (normed, sum) getitem nodes, where it has exactly one of each."""
    items = {user.args[1]: user for user in norm.users if user.target is operator.getitem}
    if len(items) != len(norm.users) or set(items) != {0, 1}:
        return None
    return items[0], items[1]


def read_quantized_rows(graph: torch.fx.Graph, linear: torch.fx.Node, x8: torch.fx.Node, scale: torch.fx.Node,
                        dtype: torch.dtype, quantized) -> None:  # fmt: skip
    """Replace `linear`, an fp8_linear with dynamic activation scales (or an int8_linear: the same arguments, its
    smooth where the input scale is), by `quantized` (fp8_linear_quantized, int8_linear_quantized) over the 8-bit rows
    x8 and their scales, which a fused producer wrote."""
    _, weight8, weight_scale, _, bias, backend = linear.args
    with graph.inserting_before(linear):
        replacement = insert_call(
            graph, quantized, (x8, scale, weight8, weight_scale, bias, dtype, backend), val=linear.meta["val"]
        )  # fmt: skip
    replacement.meta.update({k: v for k, v in linear.meta.items() if k != "val"})
    linear.replace_all_uses_with(replacement)
    graph.erase_node(linear)


def fuse_norms(graph: torch.fx.Graph, readers_of, quantizing, quantized, extra_args=lambda norm, readers: ()) -> int:
    """Each add_rms_norm whose output only linears `readers_of(normed)` accepts read becomes `quantizing` (x, r, w,
    *extra_args(norm, readers), eps, backend) -> (x8, s_x, h), and the readers `quantized` over its rows; the count.
    `extra_args` returns None where the norm cannot take them (it is left as it is)."""
    fused = 0
    for norm in calls(graph, ops.add_rms_norm.default):
        outputs = norm_outputs(norm)
        readers = readers_of(outputs[0]) if outputs else None
        if readers is None:
            continue
        normed, total = outputs
        x, residual, weight, eps, backend = norm.args
        dtype = normed.meta["val"].dtype
        if dtype != x.meta["val"].dtype:  # the fused kernel rounds the output to x's dtype
            continue
        extra = extra_args(norm, readers)
        if extra is None:
            continue
        with graph.inserting_before(norm):
            args = (x, residual, weight, *extra, eps, backend)
            x8, scale, new_total = insert_outputs(graph, insert_call(graph, quantizing, args))
        total.replace_all_uses_with(new_total)
        for linear in readers:
            read_quantized_rows(graph, linear, x8, scale, dtype, quantized)
        for node in (normed, total, norm):
            graph.erase_node(node)
        fused += 1
    return fused


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
    where the linear's backend is `kept_backend` (see the module docstring). The count."""
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
