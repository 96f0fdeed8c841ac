"""quantize_nvfp4: the decoder's linears keep NVFP4 weights (E2M1 values, an e4m3 scale per 16 input columns and a
float32 global scale) and call `compiled_llm.nvfp4_linear`, which dequantizes in registers (`quantization="nvfp4"`;
weight-only on Hopper, which has no FP4 tensor cores).

    y = linear(x, W, b)
    ->
    y = compiled_llm.nvfp4_linear(x, q, s, g, b, backend)   # W = e2m1(q) * (s * g), s per 16 columns

Runs under `nvfp4` only, after the passes that fuse linears. A checkpoint's NVFP4 tensors (ModelOpt, compressed-
tensors: compiled_llm/nvfp4_checkpoint.py) are taken as they are, fused q/k/v and gate/up with each part's global
scale (g is per output channel); otherwise each weight is rounded at compile time by ModelOpt's recipe
(custom_ops/linear/nvfp4.py), one at a time on its device, a fused weight with one global scale as ModelOpt exports
them. Linears whose input width is not a multiple of 16, the LM head (unless `quantize_lm_head`) and MoE routers keep
the model's dtype.
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.linear.nvfp4 import BLOCK, nvfp4_backend, nvfp4_linear_reference, quantize_weight
from fx_passes.derived_weights import derive, recipe
from fx_passes.quantize_fp8 import free_name, linear_weight, quantizable_linears, swap_linear
from fx_passes.quantized_reference import linears_computing_as
from fx_passes.registry import PassResult, register_pass

NVFP4_LINEAR = torch.ops.compiled_llm.nvfp4_linear.default


@recipe
def quantize_nvfp4_parameter(gm: torch.fx.GraphModule, target: str, stored: bool, weight_name: str, scales_name: str,
                             global_name: str) -> None:  # fmt: skip
    """Register the parameter `target` in NVFP4 as `weight_name`, `scales_name`, `global_name` (`stored`: the tensors a
    checkpoint attached to it, `nvfp4_tensors`, as they are), and list it in `gm.meta["nvfp4_weights"]` for the
    self-check."""
    weight = gm.get_parameter(target)
    quantized = weight.nvfp4_tensors if stored else quantize_weight(weight)
    for name, tensor in zip((weight_name, scales_name, global_name), quantized):
        gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    gm.meta.setdefault("nvfp4_weights", []).append((weight, quantized))


@register_pass("quantize_nvfp4")
def quantize_nvfp4(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.quantization != "nvfp4":
        return PassResult("quantize_nvfp4", 0)
    sites, linears, kept = quantizable_linears(gm, config)
    stored = [n for n in sites if hasattr(linear_weight(gm, n), "nvfp4_tensors")]
    if stored:  # a checkpoint's tensors: what its quantizer left in float (its ignore list) stays so
        if len(stored) < len(sites):
            kept.append(f"{len(sites) - len(stored)} linears the checkpoint stores in float")
        sites = stored
        # The recipe reads the tensors riding on the parameters: replayed over a model loaded otherwise, it would
        # round that model's weights instead, with nothing to say so.
        gm.meta["unstorable"] = "a checkpoint's NVFP4 tensors ride on its parameters, which a replay cannot check"
    narrow = [n for n in sites if linear_weight(gm, n).shape[1] % BLOCK]
    if narrow:
        sites = [n for n in sites if n not in narrow]
        kept.append(f"{len(narrow)} linears whose input width is not a multiple of {BLOCK}")
    if not sites:
        raise ValueError(f"quantization='nvfp4' found no linear it can quantize ({len(linears)} linears; kept in the "
                         f"model's dtype: {', '.join(kept) or 'none'})")  # fmt: skip
    backend, why = nvfp4_backend(linear_weight(gm, sites[0]).device, config.linear_backend)
    converted = {}  # a weight read by several linears is converted once
    gm.meta["nvfp4_weights"] = []
    for node in sites:
        target = node.args[1].target
        if target not in converted:
            names = [free_name(gm, f"{target}_nvfp4{part}") for part in ("", "_scales", "_global")]
            derive(gm, quantize_nvfp4_parameter, target, bool(stored), *names)
            converted[target] = names
        swap_linear(gm, node, NVFP4_LINEAR, lambda x, bias, attr, names=converted[target]: (
            x, *map(attr, names), bias, backend))  # fmt: skip
    origin = "the checkpoint's NVFP4 tensors as stored" if stored else "ModelOpt's rounding at compile time"
    kept = f"; kept in the model's dtype: {', '.join(kept)}" if kept else ""
    detail = f"{len(sites)} of {len(linears)} linears -> nvfp4 ({origin}; {backend}: {why}){kept}"
    return PassResult("quantize_nvfp4", len(sites), detail)


def nvfp4_module(model: torch.nn.Module, records: list):
    """The module's nn.Linear layers whose weights the pass quantized (`gm.meta["nvfp4_weights"]`) compute as the
    reference op over the same NVFP4 tensors, for the self-check's reference logits."""

    def forward(module, x, tensors, first: int, count: int) -> torch.Tensor:
        rows = slice(first, first + count)
        return nvfp4_linear_reference(x, *(t[rows] for t in tensors), module.bias)

    return linears_computing_as(model, records, forward, "nvfp4")
