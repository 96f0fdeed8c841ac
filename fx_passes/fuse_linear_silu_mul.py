"""fuse_linear_silu_mul: a gated MLP's activation joins the gate/up projection in front of it.

    gate_up = compiled_llm.linear(x, W_gate_up); gate, up = split(gate_up, [I, I], -1); a = silu(gate) * up
    ->
    a = compiled_llm.linear_silu_mul(x, W_gate_up)

For the one-token calls of batch-1 decode the GEMV computes both halves of each output and applies the
activation before it stores: one kernel, and no [2I] intermediate. Other calls run cuBLAS and one
activation kernel, as Inductor would. Runs after insert_linear_op, on the linears it routed to a backend
with such a kernel (`triton`; with `onednn` Inductor fuses the activation into one CPU kernel), and after
fuse_parallel_linears, which makes gate and up one linear.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from custom_ops.linear import FUSED_SILU_MUL_BACKENDS  # importing it registers the ops
from fx_passes.node_match import calls, is_call, single_use_call
from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
LINEAR = torch.ops.compiled_llm.linear.default


def _half(node, index: int) -> torch.fx.Node | None:
    """The split node whose `index`-th output `node` is (through an optional contiguous clone)."""
    if single_use_call(node, aten.clone.default):
        node = node.args[0]
    if not (single_use_call(node, operator.getitem) and node.args[1] == index):
        return None
    split = node.args[0]
    if not is_call(split, aten.split_with_sizes.default):
        return None
    sizes, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
    last = split.args[0].meta["val"].dim() - 1
    return split if len(sizes) == 2 and sizes[0] == sizes[1] and dim in (-1, last) else None


def gated_activation_input(product) -> torch.fx.Node | None:
    """The node G if product = silu(gate) * up with gate, up the two halves of G (split on the last dim), which
    feed nothing else; shared with fuse_silu_mul_quantize_fp8."""
    if not is_call(product, aten.mul.Tensor):
        return None
    for activated, up in (product.args[:2], reversed(product.args[:2])):
        if single_use_call(activated, aten.silu.default):
            split = _half(activated.args[0], 0)
            if split is not None and _half(up, 1) is split and len(split.users) == 2:
                return split.args[0]
    return None


def _gate_up_linear(product) -> torch.fx.Node | None:
    """The linear node L if product = silu(gate) * up with gate, up the two halves of L's output, which
    feeds nothing else."""
    linear = gated_activation_input(product)
    fusable = linear is not None and single_use_call(linear, LINEAR) and linear.args[3] in FUSED_SILU_MUL_BACKENDS
    return linear if fusable else None


@register_pass("fuse_linear_silu_mul")
def fuse_linear_silu_mul(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    sites = 0
    for product in calls(graph, aten.mul.Tensor):
        linear = _gate_up_linear(product)
        if linear is None:
            continue
        with graph.inserting_before(product):
            fused = graph.call_function(torch.ops.compiled_llm.linear_silu_mul.default, linear.args)
        fused.meta.update(product.meta)
        product.replace_all_uses_with(fused)
        sites += 1
    graph.eliminate_dead_code()
    return PassResult("fuse_linear_silu_mul", sites, f"{sites} gate/up projections with their SiLU" if sites else "")
