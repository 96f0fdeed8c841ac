"""contiguous_constants: a constant made like a strided tensor over the tokens is made contiguous instead.

    freqs = transpose(matmul(inv_freq, positions), 1, 2)      # [1, T, D/2], strides (T D/2, 1, T)
    polar(ones_like(freqs), freqs)   ->   polar(ones_like(freqs, memory_format=contiguous_format), freqs)

Inductor's constant folding replaces such a constant with a `full` if it is contiguous, and over the runtime's token
count, which is unbacked, it cannot decide that ([1, T, 32] with those strides is contiguous only where T is 1) and
stops with "Could not guard on data-dependent expression" (torch 2.11; DeepSeek-V2's complex RoPE in transformers
5.17). The constant's values are the same in any layout.
"""

from __future__ import annotations

import torch
import torch.fx
from torch._prims_common import make_contiguous_strides_for

from fx_passes.registry import PassResult, register_pass

aten = torch.ops.aten
_LIKE_CONSTANTS = (aten.ones_like.default, aten.zeros_like.default, aten.full_like.default)


def _contiguous(val: torch.Tensor) -> bool:
    # Compared as expressions: a stride that equals the contiguous one only for some token counts is not.
    expected = make_contiguous_strides_for(val.shape) if val.dim() else ()
    return [str(s) for s in val.stride()] == [str(s) for s in expected]


@register_pass("contiguous_constants")
def contiguous_constants(gm: torch.fx.GraphModule, config) -> PassResult:
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LIKE_CONSTANTS:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or _contiguous(val):
            continue
        node.kwargs = {**node.kwargs, "memory_format": torch.contiguous_format}
        node.meta["val"] = val.new_empty(val.shape)  # contiguous, and no guard on the tokens to make it
        rewritten += 1
    if rewritten:
        gm.recompile()
    return PassResult("contiguous_constants", rewritten)
