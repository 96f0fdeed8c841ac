"""quantize_nvfp4: the decoder's linears keep NVFP4 weights (E2M1 values, an e4m3 scale per 16 input columns and a
float32 global scale) and call `compiled_llm.nvfp4_linear`, which dequantizes in registers (`quantization="nvfp4"`;
weight-only on Hopper, which has no FP4 tensor cores).

    y = linear(x, W, b)
    ->
    y = compiled_llm.nvfp4_linear(x, q, s, g, smooth, b, backend)   # W / smooth = e2m1(q) * (s * g), s per 16 columns

Runs under `nvfp4` only, after the passes that fuse linears. A checkpoint's NVFP4 tensors (ModelOpt, compressed-
tensors: compiled_llm/nvfp4_checkpoint.py) are taken as they are, fused q/k/v and gate/up with each part's global
scale (g is per output channel), no smooth. Otherwise each weight is rounded at compile time by ModelOpt's recipe
(custom_ops/linear/nvfp4.py), a fused weight with one global scale as ModelOpt exports them, after AWQ's search
(fx_passes/awq_calibration.py over nvfp4.fake_quantize: a smooth per part of a fused weight and a clip per block,
searched over calibration text and cached, as int4_awq's): plain rounding measured +20.7% perplexity on
SmolLM2-135M (BENCHMARKS.md). Linears whose input width is not a multiple of 16, the LM head (unless
`quantize_lm_head`) and MoE routers keep the model's dtype.
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.linear.nvfp4 import (
    BLOCK,
    fake_quantize,
    global_scale_for,
    nvfp4_backend,
    nvfp4_linear_reference,
    quantize_weight,
)
from fx_passes.awq_calibration import awq_search
from fx_passes.calibration import calibration_sequences
from fx_passes.derived_weights import derive, recipe
from fx_passes.quantize_fp8 import free_name, keep_narrow, linear_weight, quantizable_linears, swap_linear
from fx_passes.quantize_int4 import drop_calibrated, fused_parts, register_calibrated
from fx_passes.quantized_reference import (
    check_kept,
    divided_smooth,
    linears_computing_as,
    part_smooth,
    rerounding,
    rows_of,
)
from fx_passes.registry import PassResult, register_pass

NVFP4_LINEAR = torch.ops.compiled_llm.nvfp4_linear.default


@recipe
def quantize_nvfp4_parameter(gm: torch.fx.GraphModule, target: str, stored: bool, smooth_name: str | None,
                             smooth_rows: list[int], clip_name: str | None, weight_name: str, scales_name: str,
                             global_name: str, keep_rounding: bool = True) -> None:  # fmt: skip
    """Register the parameter `target` in NVFP4 as `weight_name`, `scales_name`, `global_name` (each part of
    `smooth_rows` channels divided by its row of the graph's `smooth_name` tensor, each block clipped by its
    `clip_name` one, where given; `stored`: the tensors a checkpoint attached to it, `nvfp4_tensors`, as they are), and
    list it in `gm.meta["nvfp4_weights"]` for the self-check, with what nvfp4_module rounds the module's weight again
    with (a Rerounding: the clip, on the host, where `keep_rounding`), None for `stored`."""
    weight = gm.get_parameter(target)
    smooth = getattr(gm, smooth_name) if smooth_name else None
    if stored:
        quantized, rounding = weight.nvfp4_tensors, None
    else:
        clip = getattr(gm, clip_name) if clip_name else None
        quantized = quantize_weight(weight, divided_smooth(smooth, smooth_rows), clip)
        rounding = rerounding(clip, None, False, keep_rounding)
    for name, tensor in zip((weight_name, scales_name, global_name), quantized):
        gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    gm.meta.setdefault("nvfp4_weights", []).append((weight, (*quantized, smooth, smooth_rows, rounding)))


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
    sites = keep_narrow(gm, sites, linears, kept, lambda width: width % BLOCK == 0, BLOCK, "nvfp4")
    weights = [linear_weight(gm, n) for n in sites]
    parts = [fused_parts(gm, n.args[1].target) for n in sites]
    if stored:
        # The recipe reads the tensors riding on the parameters: replayed over a model loaded otherwise, it would
        # round that model's weights instead, with nothing to say so.
        gm.meta["unstorable"] = "a checkpoint's NVFP4 tensors ride on its parameters, which a replay cannot check"
        searched, origin = [(None, None, None)] * len(sites), "the checkpoint's NVFP4 tensors as stored"
    else:
        sequences, source = calibration_sequences(gm.meta.get("tokenizer"), gm.meta.get("vocab_size", 32000))
        searched, calibration = awq_search(gm, sites, weights, [BLOCK] * len(sites), parts, sequences,
                                           config.cache_dir, weights[0].device, fake_quantize)  # fmt: skip
        gm.meta["unstorable"] = (
            "AWQ's calibration is of this checkpoint's weights (a new compile reads it from its cache)"
        )
        origin = f"ModelOpt's rounding after {calibration}, calibrated on {source}"
    backend, why = nvfp4_backend(weights[0].device, config.linear_backend)
    converted = {}  # a weight read by several linears is converted once
    gm.meta["nvfp4_weights"] = []
    for node, (smooth, clip, _), smooth_rows in zip(sites, searched, parts):
        target = node.args[1].target
        if target not in converted:
            smooth_name, clip_name = (register_calibrated(gm, f"{target}_awq_{part}", t)
                                      for part, t in (("smooth", smooth), ("clip", clip)))  # fmt: skip
            names = [free_name(gm, f"{target}_nvfp4{part}") for part in ("", "_scales", "_global")]
            # The self-check's reference rounds the module's weight again with the clip (kept on the host)
            derive(gm, quantize_nvfp4_parameter, target, bool(stored), smooth_name, smooth_rows, clip_name, *names,
                   config.verify is not False)  # fmt: skip
            drop_calibrated(gm, clip_name)
            converted[target] = (names, smooth_name, smooth_rows if smooth_name else [])

        def make_args(x, bias, attr, converted=converted[target]):
            names, smooth_name, rows = converted
            return (x, *map(attr, names), attr(smooth_name), rows, bias, backend)

        swap_linear(gm, node, NVFP4_LINEAR, make_args)
    narrow_tiles = sum(w.shape[1] % 64 != 0 for w in weights)  # nvfp4.triton_takes: the GEMM's K tile
    if backend == "triton" and narrow_tiles:
        why += f"; {narrow_tiles} linears of a width not a multiple of 64 run the reference"
    kept = f"; kept in the model's dtype: {', '.join(kept)}" if kept else ""
    detail = f"{len(sites)} of {len(linears)} linears -> nvfp4 ({origin}; {backend}: {why}){kept}"
    return PassResult("quantize_nvfp4", len(sites), detail)


def fused_global_scale(whole: torch.Tensor, smooth: torch.Tensor | None, smooth_rows: list[int]) -> torch.Tensor:
    """The global scale [1] quantize_nvfp4_parameter rounds a weight with (a fused one's: the whole's), from the
    module's own weights, a part at a time (no [N, K] float32 copies of a fused weight's smooth)."""
    if smooth is None:
        return global_scale_for(whole.detach().float().abs().amax())
    maxima = [(rows.detach().float() / scaling.float()).abs().amax()
              for rows, scaling in zip(whole.split(list(smooth_rows)), smooth)]  # fmt: skip
    return global_scale_for(torch.stack(maxima).amax())


def rerounded(weight: torch.Tensor, whole: torch.Tensor, tensors: tuple, first: int, count: int,
              global_scale: torch.Tensor | None = None) -> tuple:  # fmt: skip
    """(weight, scales, global_scale) of a module's own `weight`, rows `first:first + count` of a calibrated record's
    `whole` weight (`tensors` as quantize_nvfp4_parameter lists them), rounded again as the pass rounded them: with its
    part's smooth, its rows of the search's clip, and the global scale of the whole (`global_scale`, or
    fused_global_scale's: a fused weight has one, as ModelOpt exports them, and rounding the rows alone would take
    their own max). Blocks are a row's, so these are the graph's rows bit for bit where the pass wrote them right."""
    _, _, _, smooth, smooth_rows, rounding = tensors
    check_kept(rounding, "nvfp4")
    if global_scale is None:
        global_scale = fused_global_scale(whole, smooth, smooth_rows)
    smooth, _ = part_smooth(smooth, smooth_rows, first, count)
    return quantize_weight(weight, smooth, rows_of(rounding.clip, first, count, weight.device), global_scale)


def nvfp4_module(model: torch.nn.Module, records: list):
    """The module's nn.Linear layers whose weights the pass quantized (`gm.meta["nvfp4_weights"]`) compute as the
    reference op (each with its part's smooth), for the self-check's reference logits. A weight the pass rounded: its
    NVFP4 tensors rounded here from the module's own weight with the search's smooth and clip (`rerounded`, at each
    forward: one layer's at a time on the device, whose memory the KV cache has taken by then), so that a code or
    scale the pass wrote wrongly is not also the reference's. A checkpoint's stored tensors (ModelOpt,
    compressed-tensors; the module's weight is their dequantization): as the graph holds them."""
    wholes = {id(tensors): whole for whole, tensors in records}  # a part's fused weight: its global scale's
    global_scales = {}  # id(tensors) -> the whole weight's: once a fused weight, not once a part

    def forward(module, x, tensors, first: int, count: int) -> torch.Tensor:
        weight, scales, global_scale, smooth, smooth_rows, rounding = tensors
        if rounding is None:  # a checkpoint's tensors
            rows = slice(first, first + count)
            stored = weight[rows], scales[rows], global_scale[rows]
        else:
            if id(tensors) not in global_scales:
                global_scales[id(tensors)] = fused_global_scale(wholes[id(tensors)], smooth, smooth_rows)
            stored = rerounded(module.weight, wholes[id(tensors)], tensors, first, count, global_scales[id(tensors)])
        smooth, smooth_rows = part_smooth(smooth, smooth_rows, first, count)  # this module's part of the fused weight
        return nvfp4_linear_reference(x, *stored, smooth, smooth_rows, module.bias)

    return linears_computing_as(model, records, forward, "nvfp4")
