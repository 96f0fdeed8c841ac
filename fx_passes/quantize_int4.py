"""quantize_int4: the decoder's linears keep 4-bit weights (W4A16) and call `compiled_llm.int4_linear`
(`quantization="int4_awq"`).

    y = linear(x, W, b)
    ->
    y = compiled_llm.int4_linear(x, q, s, z, smooth, b, G, backend)   # W / smooth in 4 bits, groups of G columns

Runs under `int4_awq` only, after the passes that fuse linears (q/k/v and gate/up are quantized fused, sharing one
smooth since they share their input), over linears whose weight is a parameter. `smooth` is AWQ's scale search
(awq_calibration.py; None where plain rounding measured better). G is 128 (AWQ's), or 64 or 32 where that does not
divide the input width (SmolLM2's 576); linears of other widths, the LM head (unless `quantize_lm_head`) and MoE
routers keep the model's dtype. Each weight is converted on its
device, one at a time, into parameters of the graph module; the model's own are left as they are.
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.linear.int4 import (
    GROUP_SIZE,
    fake_quantize,
    fake_quantize_with_offsets,
    int4_backend,
    int4_linear_reference,
    quantize_weight,
)

GROUP_SIZES = (GROUP_SIZE, 64, 32)  # the first that divides a linear's input width
from fx_passes.awq_calibration import awq_search
from fx_passes.calibration import calibration_sequences
from fx_passes.derived_weights import derive, recipe
from fx_passes.quantize_fp8 import free_name, keep_narrow, linear_weight, quantizable_linears, swap_linear
from fx_passes.quantized_reference import (
    check_kept,
    divided_smooth,
    linears_computing_as,
    part_smooth,
    rerounding,
    rows_of,
)
from fx_passes.registry import PassResult, register_pass

INT4_LINEAR = torch.ops.compiled_llm.int4_linear.default
# int4_awq's own storage: float offsets (w = q s + m), 18% less KL divergence from the float model than AWQ's zero
# points on SmolLM2-135M (BENCHMARKS.md); False stores zero points (a benchmark's A/B of the kernels' two forms).
OFFSETS = True
# Each group's scale and offset fitted by least squares (awq_calibration.fit_grid): 15% less KL divergence from the
# float SmolLM2-135M (0.1035 -> 0.0880; perplexity +10.5% -> +8.7%). Llama-8B's self-check (random weights) failed
# once with them at 1.18 of its bound, with the per-step offsets kernel; on an H100 since, the kernels came to 0.84
# of it and the reference op as the backend to 0.78 (the range's grids: 0.90), so that model is near its bound with
# any int4 rounding (BENCHMARKS.md, sessions 29 and 30). False: the range's grids.
FIT_GRIDS = True


def group_size_for(k: int) -> int | None:
    return next((g for g in GROUP_SIZES if k % g == 0), None)


@recipe
def quantize_int4_parameter(gm: torch.fx.GraphModule, target: str, group_size: int, smooth_name: str | None,
                            smooth_rows: list[int], clip_name: str | None, grid_name: str | None, stored: bool,
                            qweight_name: str, scales_name: str, zeros_name: str,
                            keep_rounding: bool = True) -> None:  # fmt: skip
    """Register the parameter `target` in 4 bits with groups of `group_size` columns (each part of `smooth_rows`
    channels divided by its row of the graph's `smooth_name` tensor, and clipped to its `clip_name` one or rounded on
    its `grid_name` one, where given)
    as `qweight_name`, `scales_name`, `zeros_name`, and list it in `gm.meta["int4_weights"]` for the self-check, with
    what int4_module rounds the module's weight again with (a Rerounding: the clip and grid, on the host, where
    `keep_rounding`) or None for `stored`: the tensors a checkpoint attached to the parameter (`int4_tensors`), taken
    as they are."""
    weight = gm.get_parameter(target)
    smooth = getattr(gm, smooth_name) if smooth_name else None
    if stored:
        quantized, rounding = weight.int4_tensors[:3], None
    else:
        clip, grid = (getattr(gm, name) if name else None for name in (clip_name, grid_name))
        divided = divided_smooth(smooth, smooth_rows)
        quantized = quantize_weight(weight, group_size, divided, clip=clip, offsets=OFFSETS, grid=grid)
        rounding = rerounding(clip, grid, OFFSETS, keep_rounding)
    for name, tensor in zip((qweight_name, scales_name, zeros_name), quantized):
        gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    gm.meta.setdefault("int4_weights", []).append((weight, (*quantized, smooth, smooth_rows, group_size, rounding)))


def fused_parts(gm: torch.fx.GraphModule, target: str) -> list[int]:
    """The rows of each weight fuse_parallel_linears concatenated into the parameter `target` ([N] for one of the
    model's own)."""
    for name, args, _ in gm.meta.get("derived_weights", ()):
        if name.endswith(".fuse_parameters") and args[0] == target:
            return [gm.get_parameter(part).shape[0] for part in args[1]]
    return [gm.get_parameter(target).shape[0]]


def _stored(gm: torch.fx.GraphModule, node: torch.fx.Node, quantization: str) -> tuple | None:
    """A checkpoint's 4-bit tensors of the linear's weight, where they run as `quantization` (int4_awq asked of a GGUF
    file calibrates its dequantized weights instead)."""
    stored = getattr(linear_weight(gm, node), "int4_tensors", None)
    return stored if stored is not None and stored[4] == quantization else None


@register_pass("quantize_int4")
def quantize_int4(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.quantization not in ("int4_awq", "int4_gptq", "gguf"):
        return PassResult("quantize_int4", 0)
    sites, linears, kept = quantizable_linears(gm, config)
    stored = [n for n in sites if _stored(gm, n, config.quantization) is not None]
    if stored:  # an AWQ or GPTQ checkpoint: its tensors as they are, nothing calibrated
        if len(stored) < len(sites):  # what its quantizer left in float (modules_to_not_convert) stays
            kept.append(f"{len(sites) - len(stored)} linears the checkpoint stores in float")
        # The recipe reads the tensors riding on the parameters: replayed over a model loaded otherwise, it would
        # round that model's weights instead, with nothing to say so.
        gm.meta["unstorable"] = "a checkpoint's 4-bit tensors ride on its parameters, which a replay cannot check"
        groups = [_stored(gm, n, config.quantization)[3] for n in stored]
        parts = [fused_parts(gm, n.args[1].target) for n in stored]
        return _rewrite(gm, config, stored, [(None, None, None)] * len(stored), groups, parts, linears, kept,
                        "the checkpoint's 4-bit weights as stored", stored=True)  # fmt: skip
    if config.quantization == "gguf" and any(hasattr(linear_weight(gm, n), "int8_tensors") for n in sites):
        return PassResult("quantize_int4", 0)  # only 5/6/8-bit blocks: keep_gguf_int8_blocks' sites
    if config.quantization in ("int4_gptq", "gguf"):
        stored_as = "a GPTQ checkpoint's stored 4-bit" if config.quantization == "int4_gptq" else "a GGUF file's"
        raise ValueError(f"quantization={config.quantization!r} runs {stored_as} weights as stored, and this model "
                         "has none (load the checkpoint or file itself); to quantize a float model, use "
                         "quantization='int4_awq'")  # fmt: skip
    sites = keep_narrow(gm, sites, linears, kept, lambda width: group_size_for(width) is not None, GROUP_SIZES[-1],
                        "int4_awq")  # fmt: skip
    weights = [linear_weight(gm, n) for n in sites]
    device = weights[0].device
    sequences, source = calibration_sequences(gm.meta.get("tokenizer"), gm.meta.get("vocab_size", 32000))
    groups = [group_size_for(w.shape[1]) for w in weights]
    parts = [fused_parts(gm, n.args[1].target) for n in sites]
    rounding = fake_quantize_with_offsets if OFFSETS else fake_quantize  # the search rounds as the weights are stored
    searched, calibration = awq_search(gm, sites, weights, groups, parts, sequences, config.cache_dir, device, rounding,
                                       fit=OFFSETS and FIT_GRIDS)  # fmt: skip
    # The scalings are these weights': a warm start of another checkpoint of this architecture must search its own
    # (from the AWQ cache where it has them), not replay plain rounding.
    gm.meta["unstorable"] = "AWQ's calibration is of this checkpoint's weights (a new compile reads it from its cache)"
    return _rewrite(gm, config, sites, searched, groups, parts, linears, kept, f"{calibration}, calibrated on {source}")


def _rewrite(gm: torch.fx.GraphModule, config, sites: list[torch.fx.Node], searched: list[tuple], groups: list[int],
             parts: list[list[int]], linears: list[torch.fx.Node], kept: list[str], origin: str,
             stored: bool = False) -> PassResult:  # fmt: skip
    """Each site -> int4_linear over its weight in 4 bits (searched: its (smooth, clip, grid); groups: its group size;
    parts: its fused parts' rows), and the pass's result."""
    device = linear_weight(gm, sites[0]).device
    backend, why = int4_backend(device, config.linear_backend)
    converted = {}  # a weight read by several linears is converted once
    gm.meta["int4_weights"] = []
    for node, (smooth, clip, grid), group_size, smooth_rows in zip(sites, searched, groups, parts):
        target = node.args[1].target
        if target not in converted:
            # Calibrated, not made by a recipe (the graph is not stored: gm.meta["unstorable"])
            smooth_name, clip_name, grid_name = (register_calibrated(gm, f"{target}_awq_{part}", t)
                                                 for part, t in (("smooth", smooth), ("clip", clip), ("grid", grid)))
            names = [free_name(gm, f"{target}_int4{part}") for part in ("", "_scales", "_zeros")]
            # The self-check's reference rounds the module's weight again with the clip and grid (kept on the host)
            derive(gm, quantize_int4_parameter, target, group_size, smooth_name, smooth_rows, clip_name, grid_name,
                   stored, *names, config.verify is not False)  # fmt: skip
            drop_calibrated(gm, clip_name, grid_name)
            converted[target] = (smooth_name, names)
        smooth_name, names = converted[target]
        rows = smooth_rows if smooth_name else []

        def make_args(x, bias, attr, names=names, smooth_name=smooth_name, rows=rows, group_size=group_size):
            return (x, *map(attr, names), attr(smooth_name), rows, bias, group_size, backend)

        swap_linear(gm, node, INT4_LINEAR, make_args)
    kept = f"; kept in the model's dtype: {', '.join(kept)}" if kept else ""
    sizes = "/".join(str(g) for g in sorted(set(groups), reverse=True))
    offsets = any(getattr(gm, names[2]).is_floating_point() for _, names in converted.values())  # GGUF Q4_1's
    detail = (f"{len(sites)} of {len(linears)} linears -> int4 (groups of {sizes}, "
              f"{'offsets' if offsets else 'zero points'}; {origin}; {backend}: {why}){kept}")  # fmt: skip
    return PassResult("quantize_int4", len(sites), detail)


def register_calibrated(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor | None) -> str | None:
    """A calibration's tensor (AWQ's smooth, clip or grid) as a float32 buffer of `gm` under a free `name`; None for
    None."""
    if tensor is None:
        return None
    name = free_name(gm, name)
    gm.register_buffer(name, tensor.float().contiguous())
    return name


def drop_calibrated(gm: torch.fx.GraphModule, *names: str | None) -> None:
    """Remove calibrated buffers only a recipe read (clips, grids: 0.2 GB each on an 8B model's GPU). The graph is
    never replayed (gm.meta["unstorable"]), so nothing reads them again (the self-check's records keep a copy on the
    host: quantized_reference.Rerounding)."""
    for name in names:
        if name is not None:
            delattr(gm, name)


def rerounded(weight: torch.Tensor, tensors: tuple, first: int, count: int) -> tuple:
    """(qweight, scales, zeros) of a module's own `weight`, rows `first:first + count` of a calibrated record's
    (`tensors`, as quantize_int4_parameter lists them), rounded again as the pass rounded them: with its part's smooth
    and its rows of the search's clip and grid. Rounding is per row (a group is a row's), so these are the graph's
    rows bit for bit where the pass wrote them right."""
    _, _, _, smooth, smooth_rows, group_size, rounding = tensors
    check_kept(rounding, "int4_awq")
    smooth, _ = part_smooth(smooth, smooth_rows, first, count)
    clip, grid = (rows_of(t, first, count, weight.device) for t in (rounding.clip, rounding.grid))
    return quantize_weight(weight, group_size, smooth, clip=clip, offsets=rounding.offsets, grid=grid)


def int4_module(model: torch.nn.Module, records: list):
    """The module's nn.Linear layers whose weights the pass quantized (`gm.meta["int4_weights"]`) compute as the
    reference op (each with its part's smooth), for the self-check's reference logits. A weight the pass rounded
    (int4_awq): its 4-bit tensors rounded here from the module's own weight with the search's smooth, clip and grid
    (`rerounded`, at each forward: one layer's at a time on the device, whose memory the KV cache has taken by then),
    so that a code or scale the pass wrote wrongly is not also the reference's. A checkpoint's stored codes (AWQ,
    GPTQ, GGUF; the module's weight is their dequantization): as the graph holds them."""

    def forward(module, x, tensors, first: int, count: int) -> torch.Tensor:
        qweight, scales, zeros, smooth, smooth_rows, group_size, rounding = tensors
        if rounding is None:  # a checkpoint's codes
            rows = slice(first, first + count)
            stored = qweight[rows], scales[rows], zeros[rows]
        else:
            stored = rerounded(module.weight, tensors, first, count)
        smooth, smooth_rows = part_smooth(smooth, smooth_rows, first, count)  # this module's part of the fused weight
        return int4_linear_reference(x, *stored, smooth, smooth_rows, module.bias, group_size)

    return linears_computing_as(model, records, forward, "int4_awq or int4_gptq")
