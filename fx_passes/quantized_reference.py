"""The self-check's reference for weight formats whose tensors the pass made from a search (int4_awq, int8_sq) or
took from a checkpoint: the module's own nn.Linear layers compute as the format's reference op over the very tensors
the rewritten graph reads, each layer its rows of them (a fused q/k/v or gate/up weight's parts share its storage).
int8_sq's reference keeps only the graph's calibrated smooth and quantizes the module's weights itself
(quantize_int8.int8_module), so a scale the pass wrote wrongly is not also the reference's; int4's and NVFP4's codes
come from a search whose clips and grids the records do not keep, and are read as the graph holds them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

# The graph meta keys under which the quantizing passes list the weights they replaced, for the self-check: tensors of
# this process, never stored with a graph.
WEIGHT_RECORDS = ("fp8_weights", "fp8_input_scales", "int4_weights", "int8_weights", "nvfp4_weights",
                  "int8_block_weights")

# forward(module, x, tensors, first, count): the layer's output from the format's tensors, of whose rows it owns
# `count` from `first`.
PartForward = Callable[[torch.nn.Linear, torch.Tensor, tuple, int, int], torch.Tensor]


def part_smooth(smooth: torch.Tensor | None, smooth_rows: list[int], first: int,
                count: int) -> tuple[torch.Tensor | None, list[int]]:  # fmt: skip
    """The (smooth, smooth_rows) of the part of a fused 4-bit weight's rows from `first` (`count` of them): its row of
    the fused weight's smooth [P, K], or none."""
    if smooth is None:
        return None, []
    part = [sum(smooth_rows[:p]) for p in range(len(smooth_rows))].index(first)
    return smooth[part : part + 1], [count]


@contextlib.contextmanager
def linears_computing_as(model: torch.nn.Module, records: list, forward: PartForward, fmt: str) -> Iterator[None]:
    """Within the block, each nn.Linear of `model` whose weight is one of `records` ((weight, tensors) as the pass
    listed them) runs `forward`. A recorded weight that no nn.Linear reads is refused, naming its shape."""
    by_storage = {w.untyped_storage().data_ptr(): (w, tensors) for w, tensors in records}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.untyped_storage().data_ptr() in by_storage]  # fmt: skip
    covered = {m.weight.untyped_storage().data_ptr() for m in linears}
    missing = [tuple(w.shape) for ptr, (w, _) in by_storage.items() if ptr not in covered]
    if missing:
        raise ValueError(f"quantization {fmt} rewrote linears over weights {missing} that no nn.Linear of the module "
                         "reads, so the self-check cannot compute what the rewrite means; compile_model(..., "
                         "verify=False) accepts it unchecked")  # fmt: skip

    def part_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        whole, tensors = by_storage[module.weight.untyped_storage().data_ptr()]
        first = (module.weight.storage_offset() - whole.storage_offset()) // whole.stride(0)
        return forward(module, x, tensors, first, module.weight.shape[0])

    try:
        for module in linears:
            module.forward = part_forward.__get__(module)
        yield
    finally:
        for module in linears:
            del module.forward
