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
from fx_passes.quantizing_producers import fuse_norms
from fx_passes.registry import PassResult, register_pass

ops = torch.ops.compiled_llm


def _int8_readers(normed: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The users of the norm's output, if every one is an int8_linear over it and all share one smooth."""
    users = list(normed.users)
    fits = all(u.target is ops.int8_linear.default and u.args[0] is normed for u in users)
    return users if users and fits and len({u.args[3] for u in users}) == 1 else None


def _smooth(norm: torch.fx.Node, readers: list[torch.fx.Node]) -> tuple | None:
    """(the readers' smooth,) for add_rms_norm_int8: a new read of its buffer before the norm (quantize_int8 put the
    linear's read after the norm, and moving a read could put it after another of its users); None for a computed
    smooth, which may not exist yet where the norm is."""
    smooth = readers[0].args[3]
    if smooth is None:
        return (None,)
    if smooth.op != "get_attr":
        return None
    with norm.graph.inserting_before(norm):
        read = norm.graph.get_attr(smooth.target)
    read.meta.update(smooth.meta)
    return (read,)


@register_pass("fuse_norm_quantize_int8")
def fuse_norm_quantize_int8(gm: torch.fx.GraphModule, config) -> PassResult:
    fused = fuse_norms(gm.graph, _int8_readers, ops.add_rms_norm_int8.default, ops.int8_linear_quantized.default,
                       _smooth)  # fmt: skip
    detail = f"{fused} RMSNorms write int8 activations" if fused else ""
    return PassResult("fuse_norm_quantize_int8", fused, detail)
