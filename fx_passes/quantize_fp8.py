"""quantize_fp8: the decoder's linears keep their weights in float8 e4m3 and call `compiled_llm.fp8_linear`
(`quantization="fp8"`) or `compiled_llm.fp8_block_linear` (`"fp8_block"`).

    y = linear(x, W, b)
    ->
    y = compiled_llm.fp8_linear(x, W8, s_w, None, b, backend)      # W8 = e4m3(W / s_w), s_w per output channel
    y = compiled_llm.fp8_block_linear(x, W8, s_w, b, backend)      # s_w per 128 x 128 block (fp8_block)

Runs under those two quantizations (a no-op otherwise), after the passes that fuse linears (q/k/v
and gate/up are quantized fused: with a scale per output channel that is the same as quantizing each), over
linears whose weight is a parameter (a `get_attr`). An FP8 checkpoint's weights (marked by fp8_checkpoint.py)
are taken as stored, and its float linears (those its quantizer left out) stay float. The LM head, the last linear
of the graph, keeps the model's
dtype unless `quantize_lm_head`, and so do MoE routers. Each weight is converted on its device, one at a time, into buffers of the
graph module (`<weight>_fp8`, `<weight>_fp8_scale`); the model's own parameters are left as they are.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.fx
from torch._subclasses.fake_tensor import is_fake

from custom_ops.linear.fp8 import FP8, FP8_MAX, MIN_AMAX, fp8_backend, fp8_linear_reference, quantize_weight
from custom_ops.linear.fp8_block import fp8_block_backend, fp8_block_linear_reference, quantize_weight_blocks
from custom_ops.moe.fp8 import moe_experts_fp8_reference, quantize_experts
from fx_passes import calibration
from fx_passes.derived_weights import derive, recipe
from fx_passes.expert_ops import expert_parameter, swap_experts_op
from fx_passes.node_match import calls
from fx_passes.registry import PassResult, register_pass

LINEAR = torch.ops.aten.linear.default
MOE_EXPERTS = torch.ops.compiled_llm.moe_experts.default
MOE_EXPERTS_FP8 = torch.ops.compiled_llm.moe_experts_fp8.default
STATIC_VERSION = "fp8-static-1"  # part of the calibration cache's key


class Fp8Format(NamedTuple):
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # weight -> (W8, scales)
    op: object
    backend: Callable[[torch.device, str], tuple[str, str]]
    reference: Callable  # the op's reference (its arguments but the backend), for the self-check
    scales: str  # for the report
    input_scale: bool  # whether the op takes a static input scale (activation_scheme="static"; else None)

    def op_args(self, x, weight8, scale, bias, input_scale=None) -> tuple:
        return (x, weight8, scale, input_scale, bias) if self.input_scale else (x, weight8, scale, bias)


FORMATS = {
    "fp8": Fp8Format(quantize_weight, torch.ops.compiled_llm.fp8_linear.default, fp8_backend, fp8_linear_reference,
                     "per-channel weight scales", input_scale=True),
    "fp8_block": Fp8Format(quantize_weight_blocks, torch.ops.compiled_llm.fp8_block_linear.default, fp8_block_backend,
                           fp8_block_linear_reference, "128x128 weight blocks, 1x128 activation groups", input_scale=False),
}  # fmt: skip


def linear_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    weight = node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    try:
        return gm.get_parameter(weight.target)
    except AttributeError:
        return None


# What picks experts: a top-k, or the routing ops (the capture's grouped routers, a fused router).
_PICKS_EXPERTS = (
    torch.ops.aten.topk.default, torch.ops.compiled_llm.moe_route.default,
    torch.ops.compiled_llm.moe_route_grouped.default,
)  # fmt: skip


def _routes_experts(node: torch.fx.Node, depth: int = 6) -> bool:
    """Whether the linear's output picks experts (reaches a top-k or a routing op within a few ops): an MoE router,
    which FP8 checkpoints keep in the model's dtype, since a rounding can change which experts a token goes to."""
    frontier = [node]
    for _ in range(depth):
        # Not through another linear: that one is the router (GPT-OSS's o_proj reaches its router's top-k in 6 ops).
        frontier = [user for n in frontier for user in n.users if user.target is not torch.ops.aten.linear.default]
        if any(user.target in _PICKS_EXPERTS for user in frontier):
            return True
    return False


def swap_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, op, make_args: Callable) -> None:
    """The linear `node` -> `op(*make_args(x, bias, attr))` in its place, where `attr(name)` reads the graph module's
    tensor `name` (None for None), its meta value that tensor's shape and dtype on the weight's fake device; the float
    weight's read goes where no other node reads it."""
    x, weight_node, *rest = node.args
    fake = weight_node.meta["val"]

    def attr(name: str | None) -> torch.fx.Node | None:
        if name is None:
            return None
        read = gm.graph.get_attr(name)
        tensor = getattr(gm, name)
        read.meta["val"] = fake.new_empty(tensor.shape, dtype=tensor.dtype)
        return read

    with gm.graph.inserting_before(node):
        replacement = gm.graph.call_function(op, make_args(x, rest[0] if rest else None, attr))
    replacement.meta.update(node.meta)
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)
    if not weight_node.users:  # the float weight, read by no other node
        gm.graph.erase_node(weight_node)


def free_name(gm: torch.fx.GraphModule, name: str) -> str:
    name = name.replace(".", "_")
    while hasattr(gm, name):
        name += "_"
    return name


@recipe
def quantize_parameter(gm: torch.fx.GraphModule, target: str, fmt: str, weight_name: str, scale_name: str) -> None:
    """Register `weight_name` and `scale_name`, the parameter `target` in format `fmt` (an FP8 checkpoint's own
    tensors where it has them), and list the parameter in `gm.meta["fp8_weights"]`."""
    weight = gm.get_parameter(target)
    quantized = checkpoint_tensors(weight) or FORMATS[fmt].quantize(weight)
    _register_quantized(gm, weight, quantized, (weight_name, scale_name))


def _register_quantized(gm: torch.fx.GraphModule, weight: torch.Tensor, quantized: tuple, names: tuple[str, str]):
    """(W8, scales) as parameters of `gm` under `names`, and `weight` listed in `gm.meta["fp8_weights"]` (a shard's,
    or a fused weight's shards': the module's weights they were cut from, which the self-check quantizes as the ranks
    do: whole, or in `gm.meta["fp8_column_parts"]` (weight, parts) where each rank holds a part of its columns)."""
    for name, tensor in zip(names, quantized):
        gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))  # as fused weights are
    if is_fake(weight) or weight.device.type == "meta":  # a rank reading its slices (checkpoint_slices.py): no
        return  # self-check to prepare
    storage = weight.untyped_storage().data_ptr()
    shards = [p for p in gm.parameters() if hasattr(p, "sharded_from") and p.untyped_storage().data_ptr() == storage]
    gm.meta.setdefault("fp8_weights", []).extend([p.sharded_from for p in shards] or [weight])
    for shard in shards:  # a row-parallel linear's columns: each rank quantizes its part (and its input's) apart
        whole = shard.sharded_from
        if shard.dim() == 2 and shard.shape[1] != whole.shape[1]:
            gm.meta.setdefault("fp8_column_parts", []).append((whole, whole.shape[1] // shard.shape[1]))


@recipe
def quantize_experts_parameter(gm: torch.fx.GraphModule, target: str, transposed: bool, weight_name: str,
                               scale_name: str) -> None:  # fmt: skip
    """Register `weight_name` and `scale_name`: the expert weights `target` ([E, N, K], or stored [E, K, N] where
    `transposed`) in e4m3 with a scale per expert and output channel (custom_ops/moe/fp8.py), and list the parameter
    in `gm.meta["fp8_weights"]`."""
    weight = gm.get_parameter(target)
    quantized = quantize_experts(weight.transpose(1, 2) if transposed else weight)
    _register_quantized(gm, weight, quantized, (weight_name, scale_name))


def _column_scales(scale: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """A checkpoint's scales for each of `parts` equal column parts of its weight: the same per channel ([N]), a
    part of the blocks' columns per 128 x 128 block ([N/128, K/128])."""
    return [scale] * parts if scale.dim() == 1 else list(scale.chunk(parts, 1))


def checkpoint_tensors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W8, scales) an FP8 checkpoint stored for this weight (compiled_llm/fp8_checkpoint.py), taken as they are
    rather than requantized from the dequantized weight; None for a float weight."""
    weight8 = getattr(weight, "fp8_weight", None)
    return None if weight8 is None else (weight8, weight.fp8_scale)


def quantizable_linears(gm: torch.fx.GraphModule, config) -> tuple[list[torch.fx.Node], list[torch.fx.Node], list[str]]:
    """(the linears over 2-D weight parameters a weight quantization rewrites, every linear of the graph, what it keeps
    in the model's dtype and why): not the LM head (the graph's last linear) unless `quantize_lm_head`, nor MoE
    routers."""
    linears = calls(gm.graph, LINEAR)
    sites = [n for n in linears if linear_weight(gm, n) is not None and linear_weight(gm, n).dim() == 2]
    kept = []
    if sites and not config.quantize_lm_head and sites[-1] is linears[-1]:
        sites, kept = sites[:-1], ["the LM head (quantize_lm_head=False)"]
    routers = [n for n in sites if _routes_experts(n)]
    if routers:
        sites = [n for n in sites if n not in routers]
        kept.append(f"{len(routers)} MoE routers")
    return sites, linears, kept


def keep_narrow(gm: torch.fx.GraphModule, sites: list[torch.fx.Node], linears: list[torch.fx.Node], kept: list[str],
                fits, multiple: int, quantization: str) -> list[torch.fx.Node]:  # fmt: skip
    """`sites` but the linears whose input width `fits(width)` refuses (kept in the model's dtype, said in `kept`: not
    a multiple of `multiple`); none left is a ValueError naming `quantization` and what was kept."""
    narrow = [n for n in sites if not fits(linear_weight(gm, n).shape[1])]
    if narrow:
        sites = [n for n in sites if n not in narrow]
        kept.append(f"{len(narrow)} linears whose input width is not a multiple of {multiple}")
    if not sites:
        raise ValueError(f"quantization={quantization!r} found no linear it can quantize ({len(linears)} linears; kept "
                         f"in the model's dtype: {', '.join(kept) or 'none'})")  # fmt: skip
    return sites


@register_pass("quantize_fp8")
def quantize_fp8(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.quantization not in FORMATS:
        return PassResult("quantize_fp8", 0)
    form = FORMATS[config.quantization]
    sites, linears, kept = quantizable_linears(gm, config)
    stored = [n for n in sites if checkpoint_tensors(linear_weight(gm, n)) is not None]
    if stored and len(stored) < len(sites):  # what an FP8 checkpoint's quantizer left in float (its ignore list) stays
        kept.append(f"{len(sites) - len(stored)} linears the checkpoint stores in float")
        sites = stored
    backend, why = form.backend(linear_weight(gm, sites[0]).device, config.linear_backend) if sites else ("torch", "")
    static = config.activation_scheme == "static" and form.input_scale and bool(sites)
    input_scales, calibration = _static_input_scales(gm, sites, config) if static else ({}, "")
    converted = {}  # a weight read by several linears is converted once
    gm.meta["fp8_weights"] = []  # the float weights replaced: the self-check quantizes the module's alike
    gm.meta["fp8_format"] = config.quantization
    for node in sites:
        target = node.args[1].target
        if target not in converted:
            names = free_name(gm, f"{target}_fp8"), free_name(gm, f"{target}_fp8_scale")
            derive(gm, quantize_parameter, target, config.quantization, *names)
            if static:
                names += (free_name(gm, f"{target}_fp8_input_scale"),)
                gm.register_buffer(names[2], input_scales[target])
                gm.meta.setdefault("fp8_input_scales", []).append((gm.get_parameter(target), input_scales[target]))
            converted[target] = names
        swap_linear(gm, node, form.op, lambda x, bias, attr, names=converted[target]: (*form.op_args(
            x, attr(names[0]), attr(names[1]), bias, attr(names[2]) if static else None), backend))  # fmt: skip
    experts = calls(gm.graph, MOE_EXPERTS)
    quantized_experts = _quantize_experts(gm, experts) if config.quantization == "fp8" else 0
    if len(experts) > quantized_experts:
        why_not = "per-channel fp8 only" if config.quantization != "fp8" else "weights not parameters"
        kept.append(f"{len(experts) - quantized_experts} MoE layers' experts ({why_not})")
    moe = f", {quantized_experts} MoE layers' experts" if quantized_experts else ""
    kept = f"; kept in the model's dtype: {', '.join(kept)}" if kept else ""
    scheme = f"static activation scales: {calibration}" if static else "dynamic activation scales"
    detail = (f"{len(sites)} of {len(linears)} linears{moe} -> float8 e4m3 ({form.scales}, {scheme}; "
              f"{backend}: {why}){kept}")  # fmt: skip
    return PassResult("quantize_fp8", len(sites) + quantized_experts, detail)


def _static_input_scales(gm: torch.fx.GraphModule, sites: list[torch.fx.Node], config) -> tuple[dict, str]:
    """activation_scheme="static": each weight's input scale, max|x| / 448 over the calibration text's inputs of
    every linear reading it (float32, a 0-dim tensor on its device), from the cache or measured now, and where they
    came from. The self-check rounds the module's inputs with the same scales."""
    start = time.perf_counter()
    targets = [node.args[1].target for node in sites]
    sequences, source = calibration.calibration_sequences(gm.meta.get("tokenizer"), gm.meta.get("vocab_size", 32000))
    key = calibration.fingerprint(gm, sequences, sorted(set(targets)), STATIC_VERSION)
    path = calibration.cache_path(config.cache_dir, "fp8_static", key)
    device = linear_weight(gm, sites[0]).device
    gm.meta["unstorable"] = (
        "FP8 static activation scales are of this checkpoint's weights (a new compile reads them from its cache)"
    )
    stored = calibration.load_entry(path)
    if stored is not None and set(stored) == set(targets):
        return {t: s.to(device) for t, s in stored.items()}, f"from the cache ({path.name})"
    amax = {}
    for node, rows in calibration.recorded_inputs(gm, sites, sequences, device):
        target = node.args[1].target
        amax[target] = torch.maximum(amax.get(target, rows.new_zeros(())), rows.abs().amax())
    scales = {t: (a.clamp(min=MIN_AMAX) * (1 / FP8_MAX)).float() for t, a in amax.items()}
    calibration.store_entry(path, {t: s.cpu() for t, s in scales.items()})
    return scales, f"calibrated over {source} in {time.perf_counter() - start:.1f} s"


def _quantize_experts(gm: torch.fx.GraphModule, experts: list[torch.fx.Node]) -> int:
    """Each `moe_experts` call over parameters -> `moe_experts_fp8` over their e4m3 copies; how many."""
    done = 0
    for node in experts:
        w13, w2 = node.args[3], node.args[4]
        found = [expert_parameter(gm, w) for w in (w13, w2)]
        if None in found:
            continue
        quantized = []
        with gm.graph.inserting_before(node):
            for (target, transposed), fake in zip(found, (w13.meta["val"], w2.meta["val"])):
                names = free_name(gm, f"{target}_fp8"), free_name(gm, f"{target}_fp8_scale")
                derive(gm, quantize_experts_parameter, target, transposed, *names)
                weight8 = gm.graph.get_attr(names[0])
                weight8.meta["val"] = fake.new_empty(fake.shape, dtype=FP8)
                scale = gm.graph.get_attr(names[1])
                scale.meta["val"] = fake.new_empty(fake.shape[:2], dtype=torch.float32)
                quantized += [weight8, scale]
        swap_experts_op(gm.graph, node, MOE_EXPERTS_FP8, quantized)
        done += 1
    return done


@contextlib.contextmanager
def quantized_module(model: torch.nn.Module, weights: list[torch.Tensor], fmt: str = "fp8",
                     column_parts: list[tuple[torch.Tensor, int]] = (),
                     input_scales: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> Iterator[None]:  # fmt: skip
    """The module's nn.Linear layers (and MoE experts) whose weights the pass quantized (`gm.meta["fp8_weights"]`; a fused
    weight's parts share its storage) compute as the reference of `fmt` (`gm.meta["fp8_format"]`) does, for the self-check's reference
    logits: the module itself, with the rounding the rewrite means to add. A quantized weight that no nn.Linear
    reads (an F.linear over a bare parameter) cannot be reproduced: refused, naming its shape. `column_parts`
    (`gm.meta["fp8_column_parts"]`): (weight, n) of row-parallel linears, whose n ranks each quantize their part of
    the columns and of the input's features, the parts' products summed (shard_tensor_parallel's all-reduce).
    `input_scales` (`gm.meta["fp8_input_scales"]`): (weight, its linears' static input scale), activation_scheme=
    "static"; the other linears' activations are scaled per token."""
    storages = {w.untyped_storage().data_ptr(): w for w in weights}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.untyped_storage().data_ptr() in storages]  # fmt: skip
    experts = [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
               and m.gate_up_proj.untyped_storage().data_ptr() in storages]  # fmt: skip
    covered = {m.weight.untyped_storage().data_ptr() for m in linears}
    covered |= {w.untyped_storage().data_ptr() for m in experts for w in (m.gate_up_proj, m.down_proj)}
    missing = [tuple(w.shape) for ptr, w in storages.items() if ptr not in covered]
    if missing:
        raise ValueError(f"quantization={fmt!r} rewrote linears over weights {missing} that no nn.Linear of the module "
                         "reads, so the self-check cannot compute what the rewrite means; compile_model(..., "
                         "verify=False) accepts it unchecked")  # fmt: skip

    form = FORMATS[fmt]

    parts_of = {w.untyped_storage().data_ptr(): parts for w, parts in column_parts}
    static_of = {w.untyped_storage().data_ptr(): scale for w, scale in input_scales}

    def forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        parts = parts_of.get(module.weight.untyped_storage().data_ptr(), 1)
        if parts > 1:  # the bias once, after the sum, as the ranks add it
            stored = checkpoint_tensors(module.weight)  # each rank's columns of it, with its scales (sharding.py)
            quantized = (zip(stored[0].chunk(parts, 1), _column_scales(stored[1], parts)) if stored is not None
                         else map(form.quantize, module.weight.chunk(parts, 1)))  # fmt: skip
            out = sum(form.reference(*form.op_args(x_part, w8, w_scale, None))
                      for x_part, (w8, w_scale) in zip(x.chunk(parts, -1), quantized))  # fmt: skip
            return out if module.bias is None else out + module.bias
        weight8, scale = checkpoint_tensors(module.weight) or form.quantize(module.weight)
        input_scale = static_of.get(module.weight.untyped_storage().data_ptr())
        return form.reference(*form.op_args(x, weight8, scale, module.bias, input_scale))

    from compiled_llm.capture.expert_routing import expert_weights, experts_activation

    activations = {m: experts_activation(m)[:2] for m in experts}  # once: it runs a probe

    def experts_forward(module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        activation, params = activations[module]
        w13, w2, b13, b2 = expert_weights(module)
        quantized = (*quantize_experts(w13), *quantize_experts(w2))
        return moe_experts_fp8_reference(hidden_states, top_k_index, top_k_weights, *quantized, b13, b2, activation,
                                         params)  # fmt: skip

    try:
        for module in linears:
            module.forward = forward.__get__(module)
        for module in experts:
            module.forward = experts_forward.__get__(module)
        yield
    finally:
        for module in (*linears, *experts):
            del module.forward
