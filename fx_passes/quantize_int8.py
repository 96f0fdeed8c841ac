"""quantize_int8: the decoder's linears run in int8, weights and activations (W8A8, SmoothQuant), through
`compiled_llm.int8_linear` (`quantization="int8_sq"`).

    y = linear(x, W, b)
    ->
    y = compiled_llm.int8_linear(x, W8, s_w, smooth, b, backend)   # W8 = int8(W / smooth), x * smooth rounded per token

Runs under `int8_sq` only, after the passes that fuse linears (q/k/v and gate/up share their input, and so one
smooth: x is quantized once for the fused GEMM). SmoothQuant's smooth (Xiao et al., 2023) is calibrated here: the
graph runs over calibration text (fx_passes/calibration.py) and, per linear, smooth_k = 1 / s_k with
s_k = max|x_k|^a / max|W_k|^(1 - a) (a = `CompileConfig.smoothquant_alpha`, 0.5 by default), which moves the
activations' outlier channels into the weight, where a scale per output channel absorbs them. Cached under
`cache_dir/smoothquant`, keyed by the weights. The LM head (unless `quantize_lm_head`) and MoE routers keep the model's
dtype.
"""

from __future__ import annotations

import time

import torch
import torch.fx
from tqdm.auto import tqdm

from custom_ops.linear.int8 import int8_backend, int8_linear_reference, quantize_weight
from fx_passes.calibration import (
    cache_path,
    calibration_sequences,
    fingerprint,
    load_entry,
    recorded_inputs,
    store_entry,
)
from fx_passes.derived_weights import derive, recipe
from fx_passes.quantize_fp8 import free_name, linear_weight, quantizable_linears, swap_linear
from fx_passes.quantized_reference import linears_computing_as
from fx_passes.registry import PassResult, register_pass

INT8_LINEAR = torch.ops.compiled_llm.int8_linear.default
VERSION = "smoothquant-1"


@recipe
def quantize_int8_parameter(gm: torch.fx.GraphModule, target: str, smooth_name: str, weight_name: str,
                            scale_name: str) -> None:  # fmt: skip
    """Register the parameter `target` divided by the graph's `smooth_name` tensor in int8 as `weight_name`, with its
    scales `scale_name`, and list it in `gm.meta["int8_weights"]` for the self-check."""
    weight = gm.get_parameter(target)
    smooth = getattr(gm, smooth_name)
    quantized = quantize_weight(weight, smooth)
    for name, tensor in zip((weight_name, scale_name), quantized):
        gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    gm.meta.setdefault("int8_weights", []).append((weight, (*quantized, smooth)))


def smoothquant_smooth(x_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """1 / s with s_k = max|x_k|^alpha / max|W_k|^(1 - alpha) (columns of W [N, K]), kept within [1e-5, 1e5]."""
    w_absmax = weight.detach().float().abs().amax(dim=0)
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return 1.0 / s.clamp(1e-5, 1e5)


def _smooths(gm, sites, weights, config, device) -> tuple[list[torch.Tensor], str]:
    """Each site's smooth, from the cache or calibrated now, and a line for the report."""
    start = time.perf_counter()
    sequences, source = calibration_sequences(gm.meta.get("tokenizer"), gm.meta.get("vocab_size", 32000))
    path = cache_path(config.cache_dir, "smoothquant", fingerprint(gm, sequences, [config.smoothquant_alpha], VERSION))
    names = [f"{i}:{tuple(w.shape)}" for i, w in enumerate(weights)]
    stored = load_entry(path)
    if stored is not None and set(stored) == set(names):
        return [stored[n].to(device) for n in names], f"SmoothQuant scales from the cache ({path.name})"
    inputs = recorded_inputs(gm, sites, sequences, device)
    smooths = [smoothquant_smooth(x.abs().amax(dim=0), weight, config.smoothquant_alpha)
               for weight, (_, x) in tqdm(zip(weights, inputs), total=len(weights), desc="SmoothQuant calibration",
                                          leave=False)]  # fmt: skip
    store_entry(path, {n: s.cpu() for n, s in zip(names, smooths)})
    return smooths, (f"SmoothQuant scales (alpha {config.smoothquant_alpha}) from {source} in "
                     f"{time.perf_counter() - start:.1f} s")  # fmt: skip


@register_pass("quantize_int8")
def quantize_int8(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.quantization != "int8_sq":
        return PassResult("quantize_int8", 0)
    sites, linears, kept = quantizable_linears(gm, config)
    if not sites:
        raise ValueError(f"quantization='int8_sq' found no linear it can quantize ({len(linears)} linears; kept in "
                         f"the model's dtype: {', '.join(kept) or 'none'})")  # fmt: skip
    weights = [linear_weight(gm, n) for n in sites]
    device = weights[0].device
    smooths, calibration = _smooths(gm, sites, weights, config, device)
    gm.meta["unstorable"] = (
        "SmoothQuant's scales are of this checkpoint's weights (a new compile reads them from its cache)"
    )
    backend, why = int8_backend(device, config.linear_backend)
    converted = {}
    gm.meta["int8_weights"] = []
    for node, smooth in zip(sites, smooths):
        target = node.args[1].target
        if target not in converted:
            smooth_name = free_name(gm, f"{target}_smoothquant")
            gm.register_buffer(smooth_name, smooth.to(device, torch.float32).contiguous())
            names = free_name(gm, f"{target}_int8"), free_name(gm, f"{target}_int8_scale")
            derive(gm, quantize_int8_parameter, target, smooth_name, *names)
            converted[target] = (smooth_name, *names)
        smooth_name, weight_name, scale_name = converted[target]
        swap_linear(gm, node, INT8_LINEAR, lambda x, bias, attr, names=(weight_name, scale_name, smooth_name): (
            x, *map(attr, names), bias, backend))  # fmt: skip
    kept = f"; kept in the model's dtype: {', '.join(kept)}" if kept else ""
    detail = (f"{len(sites)} of {len(linears)} linears -> int8 weights and per-token int8 activations ({calibration}; "
              f"{backend}: {why}){kept}")  # fmt: skip
    return PassResult("quantize_int8", len(sites), detail)


def int8_module(model: torch.nn.Module, records: list):
    """The module's nn.Linear layers whose weights the pass quantized (`gm.meta["int8_weights"]`) compute as the
    reference op, for the self-check's reference logits: with the pass's calibrated smooth, but their int8 weights and
    scales quantized here from the module's own weight (per row, as the pass does a fused weight's; at each forward,
    one layer's at a time on the device, whose memory the KV cache has taken by then), so a wrong tensor the pass wrote
    cannot also be the reference's."""

    def forward(module, x, tensors, first: int, count: int) -> torch.Tensor:
        smooth = tensors[2]
        return int8_linear_reference(x, *quantize_weight(module.weight, smooth), smooth, module.bias)

    return linears_computing_as(model, records, forward, "int8_sq")
