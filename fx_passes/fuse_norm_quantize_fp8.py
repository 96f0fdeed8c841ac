"""fuse_norm_quantize_fp8: a residual add + RMSNorm whose output only FP8 linears read writes their activations.

    y, h = compiled_llm.add_rms_norm(x, r, w, eps, backend)
    q = compiled_llm.fp8_linear(y, W8, s_w, None, b, backend')              (every user of y)
    ->
    x8, s_x, h = compiled_llm.add_rms_norm_fp8(x, r, w, eps, backend)
    q = compiled_llm.fp8_linear_quantized(x8, s_x, W8, s_w, b, dtype, backend')

Exact: the fused op rounds as the two ops did (custom_ops/rms_norm/fp8.py), so the norm writes 1 byte a value and
a scale a row, and no linear quantizes the same rows again. After quantize_fp8 (dynamic activation scales only:
a static scale is not the norm's to compute), before the Inductor compile; in a decoder layer the q/k/v and the
gate/up projections read the two norms.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import custom_ops.rms_norm  # noqa: F401  (registers the ops)
from fx_passes.node_match import calls
from fx_passes.node_meta import insert_call, insert_outputs
from fx_passes.registry import PassResult, register_pass

ops = torch.ops.compiled_llm


def norm_outputs(norm: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """add_rms_norm's (normed, sum) getitem nodes, where it has exactly one of each."""
    items = {user.args[1]: user for user in norm.users if user.target is operator.getitem}
    if len(items) != len(norm.users) or set(items) != {0, 1}:
        return None
    return items[0], items[1]


def _fp8_readers(normed: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The users of the norm's output, if every one is an fp8_linear over it with dynamic activation scales."""
    users = list(normed.users)
    fits = all(u.target is ops.fp8_linear.default and u.args[0] is normed and u.args[3] is None for u in users)
    return users if users and fits else None


def read_quantized_rows(graph: torch.fx.Graph, linear: torch.fx.Node, x8: torch.fx.Node, scale: torch.fx.Node,
                        dtype: torch.dtype, quantized=ops.fp8_linear_quantized.default) -> None:  # fmt: skip
    """Replace `linear`, an fp8_linear with dynamic activation scales (or an int8_linear: the same arguments, its
    smooth where the input scale is), by `quantized` (fp8_linear_quantized, int8_linear_quantized) over the 8-bit rows
    x8 and their scales, which a fused producer wrote (shared with fuse_silu_mul_quantize_fp8 and the int8 fusions)."""
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


@register_pass("fuse_norm_quantize_fp8")
def fuse_norm_quantize_fp8(gm: torch.fx.GraphModule, config) -> PassResult:
    fused = fuse_norms(gm.graph, _fp8_readers, ops.add_rms_norm_fp8.default, ops.fp8_linear_quantized.default)
    return PassResult("fuse_norm_quantize_fp8", fused, f"{fused} RMSNorms write FP8 activations" if fused else "")
