"""keep_mxfp4_experts: under quantization="mxfp4" (an MXFP4 checkpoint: GPT-OSS's), each MoE layer's experts run from
the checkpoint's own MXFP4 tensors, dequantized in the kernel, instead of the dequantized copies the model holds.

    y = compiled_llm.moe_experts(x, ids, w, W13, W2, b13, b2, act, params, backend)
    ->
    y = compiled_llm.moe_experts_mxfp4(x, ids, w, W13_blocks, W13_scales, W2_blocks, W2_scales, b13, b2, act, params,
                                       backend)

The loader (compiled_llm/mxfp4_checkpoint.py) leaves each experts parameter holding the exact dequantization of its
checkpoint tensors and carries those tensors as attributes (`mxfp4_blocks` [E, N, K / 2], `mxfp4_scales` [E, N, K /
32]); a recipe registers them on the graph module, so a stored rewritten graph takes the next model's. The rewrite
is exact: the kernel computes with the very values the model's parameters hold. Experts without MXFP4 tensors are
refused by name: quantizing float experts to MXFP4 is not supported (quantization="fp8" quantizes them).
"""

from __future__ import annotations

import torch
import torch.fx

import custom_ops.moe  # noqa: F401  (registers the experts ops)
from fx_passes.derived_weights import derive, recipe
from fx_passes.expert_ops import expert_parameter, swap_experts_op
from fx_passes.node_match import calls
from fx_passes.quantize_fp8 import free_name
from fx_passes.registry import PassResult, register_pass

MOE_EXPERTS = torch.ops.compiled_llm.moe_experts.default
MOE_EXPERTS_MXFP4 = torch.ops.compiled_llm.moe_experts_mxfp4.default


def mxfp4_tensors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(blocks, scales) an MXFP4 checkpoint stored for this experts parameter, or None."""
    blocks = getattr(weight, "mxfp4_blocks", None)
    return None if blocks is None else (blocks, weight.mxfp4_scales)


@recipe
def mxfp4_experts_parameter(gm: torch.fx.GraphModule, target: str, blocks_name: str, scales_name: str) -> None:
    """Register `blocks_name` and `scales_name`: the MXFP4 checkpoint tensors the experts parameter `target` carries."""
    weight = gm.get_parameter(target)
    stored = mxfp4_tensors(weight)
    if stored is None:
        raise ValueError(f"quantization='mxfp4': the experts weight {target} {tuple(weight.shape)} carries no MXFP4 "
                         "checkpoint tensors (load the checkpoint with compiled_llm.model_source.load_model)")  # fmt: skip
    for name, tensor in zip((blocks_name, scales_name), stored):
        gm.register_buffer(name, tensor)


@register_pass("keep_mxfp4_experts")
def keep_mxfp4_experts(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.quantization != "mxfp4":
        return PassResult("keep_mxfp4_experts", 0)
    experts = calls(gm.graph, MOE_EXPERTS)
    for node in experts:
        x, w13, w2 = node.args[0], node.args[3], node.args[4]
        found = [expert_parameter(gm, w) for w in (w13, w2)]
        if None in found or any(mxfp4_tensors(gm.get_parameter(target)) is None for target, _ in found):
            raise ValueError(f"quantization='mxfp4' keeps an MXFP4 checkpoint's experts, but {node.name}'s weights are "
                             "not from one; quantizing float experts to MXFP4 is not supported: use quantization='fp8' "
                             "or 'none'")  # fmt: skip
        args = []
        with gm.graph.inserting_before(node):
            for target, _ in found:  # a transposed parameter's tensors are in the logical [E, N, K] orientation
                names = free_name(gm, f"{target}_mxfp4_blocks"), free_name(gm, f"{target}_mxfp4_scales")
                derive(gm, mxfp4_experts_parameter, target, *names)
                for name in names:
                    attr = gm.graph.get_attr(name)
                    stored = getattr(gm, name)
                    attr.meta["val"] = x.meta["val"].new_empty(stored.shape, dtype=stored.dtype)
                    args.append(attr)
        swap_experts_op(gm.graph, node, MOE_EXPERTS_MXFP4, args)
    layers = f"{len(experts)} MoE layers' experts from the checkpoint's MXFP4 blocks (dequantized in the kernel)"
    return PassResult("keep_mxfp4_experts", len(experts), layers)

