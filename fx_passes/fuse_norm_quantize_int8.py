"""fuse_norm_quantize_int8: a residual add + RMSNorm whose output only int8 linears with one smooth read writes their
activations (SmoothQuant's per-token int8 quantization fused into the preceding norm).

    y, h = compiled_llm.add_rms_norm(x, r, w, eps, backend)
    q = compiled_llm.int8_linear(y, W8, s_w, smooth, b, backend')              (every user of y, one smooth)
    ->
    x8, s_x, h = compiled_llm.add_rms_norm_int8(x, r, w, smooth, eps, backend)
    q = compiled_llm.int8_linear_quantized(x8, s_x, W8, s_w, b, dtype, backend')

Exact: the fused op rounds as the two ops did (custom_ops/rms_norm/int8.py), so the norm writes 1 byte a value and a
scale a row, and no linear quantizes the same rows again. After quantize_int8, which fuses q/k/v and gate/up before
it calibrates, so in a decoder layer each norm feeds one linear with one smooth.
"""

from __future__ import annotations

import torch
import torch.fx

import custom_ops.rms_norm  # noqa: F401  (registers the ops: the norms', and through them the int8 linears')
from fx_passes.fuse_norm_quantize_fp8 import norm_outputs
from fx_passes.node_match import calls
from fx_passes.node_meta import insert_call, insert_outputs
from fx_passes.registry import PassResult, register_pass

ops = torch.ops.compiled_llm


def _int8_readers(normed: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The users of the norm's output, if every one is an int8_linear over it and all share one smooth."""
    users = list(normed.users)
    fits = all(u.target is ops.int8_linear.default and u.args[0] is normed for u in users)
    return users if users and fits and len({u.args[3] for u in users}) == 1 else None


def read_int8_rows(graph: torch.fx.Graph, linear: torch.fx.Node, x8: torch.fx.Node, scale: torch.fx.Node,
                   dtype: torch.dtype) -> None:  # fmt: skip
    """Replace `linear`, an int8_linear, by int8_linear_quantized over the int8 rows x8 and their scales, which a fused
    producer wrote with the linear's smooth (shared with fuse_silu_mul_quantize_int8)."""
    _, weight8, weight_scale, _, bias, backend = linear.args
    with graph.inserting_before(linear):
        replacement = insert_call(
            graph, ops.int8_linear_quantized.default, (x8, scale, weight8, weight_scale, bias, dtype, backend),
            val=linear.meta["val"],
        )  # fmt: skip
    replacement.meta.update({k: v for k, v in linear.meta.items() if k != "val"})
    linear.replace_all_uses_with(replacement)
    graph.erase_node(linear)


@register_pass("fuse_norm_quantize_int8")
def fuse_norm_quantize_int8(gm: torch.fx.GraphModule, config) -> PassResult:
    graph = gm.graph
    fused = 0
    for norm in calls(graph, ops.add_rms_norm.default):
        outputs = norm_outputs(norm)
        readers = _int8_readers(outputs[0]) if outputs else None
        if readers is None:
            continue
        normed, total = outputs
        x, residual, weight, eps, backend = norm.args
        dtype = normed.meta["val"].dtype
        if dtype != x.meta["val"].dtype:  # the fused kernel rounds the output to x's dtype
            continue
        smooth = readers[0].args[3]
        if smooth is not None:
            if smooth.op != "get_attr":  # a computed smooth may not exist yet where the norm is
                continue
            norm.prepend(smooth)  # quantize_int8 put the buffer's read before the linear, after the norm
        with graph.inserting_before(norm):
            args = (x, residual, weight, smooth, eps, backend)
            x8, scale, new_total = insert_outputs(graph, insert_call(graph, ops.add_rms_norm_int8.default, args))
        total.replace_all_uses_with(new_total)
        for linear in readers:
            read_int8_rows(graph, linear, x8, scale, dtype)
        for node in (normed, total, norm):
            graph.erase_node(node)
        fused += 1
    detail = f"{fused} RMSNorms write int8 activations" if fused else ""
    return PassResult("fuse_norm_quantize_int8", fused, detail)
