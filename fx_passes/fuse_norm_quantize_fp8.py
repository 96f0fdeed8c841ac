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

import torch
import torch.fx

import custom_ops.rms_norm  # noqa: F401  (registers the ops)
from fx_passes.quantizing_producers import fuse_norms
from fx_passes.registry import PassResult, register_pass

ops = torch.ops.compiled_llm


def _fp8_readers(normed: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The users of the norm's output, if every one is an fp8_linear over it with dynamic activation scales."""
    users = list(normed.users)
    fits = all(u.target is ops.fp8_linear.default and u.args[0] is normed and u.args[3] is None for u in users)
    return users if users and fits else None


@register_pass("fuse_norm_quantize_fp8")
def fuse_norm_quantize_fp8(gm: torch.fx.GraphModule, config) -> PassResult:
    fused = fuse_norms(gm.graph, _fp8_readers, ops.add_rms_norm_fp8.default, ops.fp8_linear_quantized.default)
    return PassResult("fuse_norm_quantize_fp8", fused, f"{fused} RMSNorms write FP8 activations" if fused else "")
