"""keep_mxfp4_experts: under quantization="mxfp4" (an MXFP4 checkpoint: GPT-OSS's), each MoE layer's experts run from
the checkpoint's own MXFP4 tensors, dequantized in the kernel, instead of the dequantized copies the model holds.

    y = compiled_llm.moe_experts(x, ids, w, W13, W2, b13, b2, act, params, backend)
    ->
    y = compiled_llm.moe_experts_mxfp4(x, ids, w, W13_blocks, W13_scales, W2_blocks, W2_scales, b13, b2, act, params,
                                       backend)

The loader (compiled_llm/mxfp4_checkpoint.py) leaves each experts parameter holding the exact dequantization of its
checkpoint tensors and carries those tensors as attributes (`mxfp4_blocks` [E, N, K / 2], `mxfp4_scales` [E, N, K /
32]); a recipe registers them on the graph module, so a stored rewritten graph takes the next model's. The rewrite
is exact: the kernel computes with the very values the model's parameters hold (checked when the recipe runs, expert
by expert: bytes a later in-place change of the parameter left behind are refused). Experts without MXFP4 tensors are
refused by name: quantizing float experts to MXFP4 is not supported (quantization="fp8" quantizes them).
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.moe.mxfp4 import dequantize_mxfp4
from fx_passes.derived_weights import derive, recipe
from fx_passes.expert_ops import expert_parameter, swap_experts_op
from fx_passes.node_match import calls
from fx_passes.quantize_fp8 import free_name
from fx_passes.registry import PassResult, register_pass

MOE_EXPERTS = torch.ops.compiled_llm.moe_experts.default
MOE_EXPERTS_MXFP4 = torch.ops.compiled_llm.moe_experts_mxfp4.default
# The largest e8m0 exponent the kernel decodes (2^(s - 127) built as float32 bits with 14 added: 240 + 14 < 255);
# trained weights sit near s = 120-130.
MAX_EXPONENT = 240


def mxfp4_tensors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(blocks, scales) an MXFP4 checkpoint stored for this experts parameter, or None."""
    blocks = getattr(weight, "mxfp4_blocks", None)
    return None if blocks is None else (blocks, weight.mxfp4_scales)


@recipe
def mxfp4_experts_parameter(gm: torch.fx.GraphModule, target: str, transposed: bool, blocks_name: str,
                            scales_name: str) -> None:  # fmt: skip
    """Register `blocks_name` and `scales_name`: the MXFP4 checkpoint tensors the experts parameter `target` (stored
    [E, K, N] where `transposed`) carries, once checked to decode to the values it holds, expert by expert: bytes left
    behind by an in-place change of the parameter (a state dict loaded into it, a merged adapter) are refused."""
    weight = gm.get_parameter(target)
    stored = mxfp4_tensors(weight)
    if stored is None:
        raise ValueError(f"quantization='mxfp4': the experts weight {target} {tuple(weight.shape)} carries no MXFP4 "
                         "checkpoint tensors (load the checkpoint with compiled_llm.model_source.load_model)")  # fmt: skip
    blocks, scales = stored
    if weight.dtype not in (torch.bfloat16, torch.float32):  # float16's range cannot hold every e8m0 exponent
        raise ValueError(f"quantization='mxfp4': {target} is {weight.dtype}; MXFP4 experts decode exactly into bfloat16 "
                         "or float32 only: load the model in one of those")  # fmt: skip
    if int(scales.max()) > MAX_EXPONENT:
        raise ValueError(f"quantization='mxfp4': {target}'s MXFP4 exponents reach {int(scales.max())}; the kernel takes "
                         f"up to {MAX_EXPONENT} (weights below 2^114)")  # fmt: skip
    logical = weight.transpose(1, 2) if transposed else weight
    for expert in range(logical.shape[0]):  # one at a time: the decode's temporaries are several times the expert
        if not torch.equal(dequantize_mxfp4(blocks[expert], scales[expert], weight.dtype), logical[expert]):
            raise ValueError(f"quantization='mxfp4': {target} (expert {expert}) no longer holds what its checkpoint's "
                             "MXFP4 bytes decode to: it was changed after loading; reload the checkpoint, or compile "
                             "with quantization='none' to run the weights as they are")  # fmt: skip
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
            for target, transposed in found:  # the tensors are in the logical [E, N, K] orientation either way
                names = free_name(gm, f"{target}_mxfp4_blocks"), free_name(gm, f"{target}_mxfp4_scales")
                derive(gm, mxfp4_experts_parameter, target, transposed, *names)
                for name in names:
                    attr = gm.graph.get_attr(name)
                    stored = getattr(gm, name)
                    attr.meta["val"] = x.meta["val"].new_empty(stored.shape, dtype=stored.dtype)
                    args.append(attr)
        swap_experts_op(gm.graph, node, MOE_EXPERTS_MXFP4, args)
    layers = f"{len(experts)} MoE layers' experts from the checkpoint's MXFP4 blocks (dequantized in the kernel)"
    return PassResult("keep_mxfp4_experts", len(experts), layers)

