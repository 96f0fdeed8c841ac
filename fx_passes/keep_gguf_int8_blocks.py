"""keep_gguf_int8_blocks: under `quantization="gguf"`, the decoder linears whose weights carry a GGUF file's Q5_K, Q6_K
or Q8_0 blocks (compiled_llm/gguf_blocks.py's `int8_tensors`) call `compiled_llm.int8_weight_linear` over them.

    y = linear(x, W, b)
    ->
    y = compiled_llm.int8_weight_linear(x, q, s, m, b, G, backend)   # W = q s (+ m) per group of G columns

The 4-bit kinds (Q4_0, Q4_1, Q4_K) are quantize_int4's; a file mixes them (Q4_K_M keeps some linears in Q6_K). Fused
q/k/v and gate/up keep their blocks where every part has them in one form (fuse_parallel_linears). Each weight's
codes are registered once, as parameters of the graph module; the self-check computes the module's linears with the
reference op over them.
"""

from __future__ import annotations

import torch
import torch.fx

from custom_ops.linear.int8_weight import int8_weight_backend, int8_weight_linear_reference
from fx_passes.derived_weights import derive, recipe
from fx_passes.quantize_fp8 import free_name, linear_weight, quantizable_linears, swap_linear
from fx_passes.quantized_reference import linears_computing_as
from fx_passes.registry import PassResult, register_pass

INT8_WEIGHT_LINEAR = torch.ops.compiled_llm.int8_weight_linear.default


@recipe
def keep_int8_blocks_parameter(gm: torch.fx.GraphModule, target: str, names: list[str | None]) -> None:
    """Register the `int8_tensors` a GGUF file attached to the parameter `target` (codes, scales, offsets or None)
    under `names`, and list them in `gm.meta["int8_block_weights"]` for the self-check."""
    weight = gm.get_parameter(target)
    codes, scales, offsets, group_size, _ = weight.int8_tensors
    for name, tensor in zip(names, (codes, scales, offsets)):
        if name is not None:
            gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    gm.meta.setdefault("int8_block_weights", []).append((weight, (codes, scales, offsets, group_size)))


@register_pass("keep_gguf_int8_blocks")
def keep_gguf_int8_blocks(gm: torch.fx.GraphModule, config) -> PassResult:
    if config.quantization != "gguf":
        return PassResult("keep_gguf_int8_blocks", 0)
    sites, linears, _ = quantizable_linears(gm, config)
    sites = [n for n in sites if getattr(linear_weight(gm, n), "int8_tensors", (None,) * 5)[4] == "gguf"]
    if not sites:
        return PassResult("keep_gguf_int8_blocks", 0)
    # The recipe reads the tensors riding on the parameters: replayed over a model loaded otherwise, it would find none.
    gm.meta["unstorable"] = "a GGUF file's blocks ride on its parameters, which a replay cannot check"
    backend, why = int8_weight_backend(linear_weight(gm, sites[0]).device, config.linear_backend)
    converted = {}
    gm.meta["int8_block_weights"] = []
    for node in sites:
        target = node.args[1].target
        stored = linear_weight(gm, node).int8_tensors
        if target not in converted:
            names = [free_name(gm, f"{target}_q{part}") for part in ("8", "8_scales")]
            names.append(free_name(gm, f"{target}_q8_offsets") if stored[2] is not None else None)
            derive(gm, keep_int8_blocks_parameter, target, names)
            converted[target] = names

        def make_args(x, bias, attr, names=converted[target], group_size=stored[3]):
            return (x, *map(attr, names), bias, group_size, backend)

        swap_linear(gm, node, INT8_WEIGHT_LINEAR, make_args)
    groups = "/".join(str(g) for g in sorted({gm.get_parameter(t).int8_tensors[3] for t in converted}))
    detail = (f"{len(sites)} of {len(linears)} linears -> 8-bit codes (a GGUF file's Q5_K/Q6_K/Q8_0 blocks, groups "
              f"of {groups}; {backend}: {why})")  # fmt: skip
    return PassResult("keep_gguf_int8_blocks", len(sites), detail)


def int8_block_module(model: torch.nn.Module, records: list):
    """The module's nn.Linear layers whose GGUF blocks the pass kept (`gm.meta["int8_block_weights"]`) compute as the
    reference op over them, for the self-check's reference logits."""

    def forward(module, x, tensors, first: int, count: int) -> torch.Tensor:
        codes, scales, offsets, group_size = tensors
        rows = slice(first, first + count)
        return int8_weight_linear_reference(x, codes[rows], scales[rows], None if offsets is None else offsets[rows],
                                            module.bias, group_size)  # fmt: skip

    return linears_computing_as(model, records, forward, "gguf")
