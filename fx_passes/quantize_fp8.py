"""quantize_fp8: the decoder's linears keep their weights in float8 e4m3 and call `compiled_llm.fp8_linear`.

    y = linear(x, W, b)
    ->
    y = compiled_llm.fp8_linear(x, W8, s_w, None, b, backend)      # W8 = e4m3(W / s_w), s_w per output channel

Runs under `CompileConfig.quantization="fp8"` (a no-op otherwise), after the passes that fuse linears (q/k/v
and gate/up are quantized fused: with a scale per output channel that is the same as quantizing each), over
linears whose weight is a parameter (a `get_attr`). The LM head, the last linear of the graph, keeps the model's
dtype unless `quantize_lm_head`, and so do MoE routers. Each weight is converted on its device, one at a time, into buffers of the
graph module (`<weight>_fp8`, `<weight>_fp8_scale`); the model's own parameters are left as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.fx

from custom_ops.linear.fp8 import FP8, fp8_backend, fp8_linear_reference, quantize_weight
from fx_passes.node_match import calls
from fx_passes.registry import PassResult, register_pass

LINEAR = torch.ops.aten.linear.default


def _weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    weight = node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    try:
        return gm.get_parameter(weight.target)
    except AttributeError:
        return None


def _routes_experts(node: torch.fx.Node, depth: int = 6) -> bool:
    """Whether the linear's output picks experts (reaches a top-k within a few ops): an MoE router, which FP8
    checkpoints keep in the model's dtype, since a rounding can change which experts a token goes to."""
    frontier = [node]
    for _ in range(depth):
        frontier = [user for n in frontier for user in n.users]
        if any(user.target is torch.ops.aten.topk.default for user in frontier):
            return True
    return False


def _register(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor) -> str:
    name = name.replace(".", "_")
    while hasattr(gm, name):
        name += "_"
    gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))  # as fused weights are
    return name


@register_pass("quantize_fp8")
def quantize_fp8(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.quantization != "fp8":
        return PassResult("quantize_fp8", 0)
    linears = calls(gm.graph, LINEAR)
    sites = [n for n in linears if _weight(gm, n) is not None and _weight(gm, n).dim() == 2]
    kept = []
    if sites and not config.quantize_lm_head and sites[-1] is linears[-1]:
        sites, kept = sites[:-1], ["the LM head (quantize_lm_head=False)"]
    routers = [n for n in sites if _routes_experts(n)]
    if routers:
        sites = [n for n in sites if n not in routers]
        kept.append(f"{len(routers)} MoE routers")
    backend, why = fp8_backend(_weight(gm, sites[0]).device, config.linear_backend) if sites else ("torch", "")
    converted = {}  # a weight read by several linears is converted once
    gm.meta["fp8_weights"] = []  # the float weights replaced: the self-check quantizes the module's alike
    for node in sites:
        target = node.args[1].target
        if target not in converted:
            gm.meta["fp8_weights"].append(_weight(gm, node))
            weight8, scale = quantize_weight(_weight(gm, node))
            converted[target] = (_register(gm, f"{target}_fp8", weight8), _register(gm, f"{target}_fp8_scale", scale))
        weight_name, scale_name = converted[target]
        x, weight_node, *rest = node.args
        bias = rest[0] if rest else None
        fake = weight_node.meta["val"]
        with gm.graph.inserting_before(node):
            weight8_node = gm.graph.get_attr(weight_name)
            weight8_node.meta["val"] = fake.new_empty(fake.shape, dtype=FP8)
            scale_node = gm.graph.get_attr(scale_name)
            scale_node.meta["val"] = fake.new_empty(fake.shape[0], dtype=torch.float32)
            op = gm.graph.call_function(torch.ops.compiled_llm.fp8_linear.default,
                                        (x, weight8_node, scale_node, None, bias, backend))  # fmt: skip
        op.meta.update(node.meta)
        node.replace_all_uses_with(op)
        gm.graph.erase_node(node)
        if not weight_node.users:  # the float weight, read by no other node
            gm.graph.erase_node(weight_node)
    kept = f"; kept in the model's dtype: {', '.join(kept)}" if kept else ""
    return PassResult("quantize_fp8", len(sites), f"{len(sites)} of {len(linears)} linears -> float8 e4m3 "
                      f"(per-channel weight scales, {config.activation_scheme} activation scales; {backend}: {why}){kept}")  # fmt: skip


@contextlib.contextmanager
def quantized_module(model: torch.nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """The module's nn.Linear layers whose weights the pass quantized (`gm.meta["fp8_weights"]`; a fused
    weight's parts share its storage) compute as `fp8_linear`'s reference does, for the self-check's reference
    logits: the module itself, with the rounding the rewrite means to add. A quantized weight that no nn.Linear
    reads (an F.linear over a bare parameter) cannot be reproduced: refused, naming its shape."""
    storages = {w.untyped_storage().data_ptr(): w for w in weights}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.untyped_storage().data_ptr() in storages]  # fmt: skip
    covered = {m.weight.untyped_storage().data_ptr() for m in linears}
    missing = [tuple(w.shape) for ptr, w in storages.items() if ptr not in covered]
    if missing:
        raise ValueError(f"quantization='fp8' rewrote linears over weights {missing} that no nn.Linear of the module "
                         "reads, so the self-check cannot compute what the rewrite means; compile_model(..., "
                         "verify=False) accepts it unchecked")  # fmt: skip

    def forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear_reference(x, *quantize_weight(module.weight), None, module.bias)

    try:
        for module in linears:
            module.forward = forward.__get__(module)
        yield
    finally:
        for module in linears:
            del module.forward
