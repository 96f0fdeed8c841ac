"""How to call a user's decoder: which argument takes the token ids, which (if any) the positions, and where
the logits are in what it returns.

Hugging Face models take `input_ids` and `position_ids` ([batch, seq] each) and return an object with
`.logits`. Modules written elsewhere take the token ids first under any name (`idx`, `tokens`, ...), the
positions under one of a few names or not at all (nanoGPT and minGPT derive them with `torch.arange`; the
`runtime_positions` pass replaces that with the runtime's positions), and return the logits alone, first
in a tuple (`(logits, loss)`), or as `.logits`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

# Names a position argument goes by, and the rank its codebase gives it: HF's position_ids are
# [batch, seq]; gpt-fast's input_pos is [seq]; Meta's reference Llama takes start_pos, the int position of
# the first token. start_pos is captured as 0, so the graph computes positions 0..T-1 from it (slices of
# its tables and cache at [0:T]) and the runtime_positions pass makes those the runtime's positions. A
# plain `pos` is taken as [seq], or as start_pos where it is annotated `int`.
POSITION_ARGUMENTS = {"position_ids": 2, "input_pos": 1, "start_pos": 0, "pos": 1}


@dataclass(frozen=True)
class ForwardSignature:
    tokens: str  # the parameter that takes token ids [batch, seq]
    positions: str | None  # the parameter that takes positions, if the forward has one
    positions_rank: int = 2  # 2: [batch, seq]; 1: [seq]; 0: the int position of the first token

    def call(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, **extra):
        """model(...) on one flat sequence: input_ids and position_ids are [T]."""
        kwargs = {self.tokens: input_ids[None], **extra}
        if self.positions is not None:
            if self.positions_rank == 0:  # positions 0..T-1: runtime_positions replaces what they index
                kwargs[self.positions] = 0
            else:
                kwargs[self.positions] = position_ids[None] if self.positions_rank == 2 else position_ids
        return model(**kwargs)


def forward_signature(model: nn.Module) -> ForwardSignature:
    """The signature of `model.forward`; ValueError if it takes no argument that could be token ids."""
    params = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]  # fmt: skip
    if not params:
        raise ValueError(
            f"{type(model).__name__}.forward takes no arguments: a decoder's forward takes token ids [batch, seq] "
            "first and returns logits [batch, seq, vocab]"
        )
    names = [p.name for p in params]
    tokens = "input_ids" if "input_ids" in names else names[0]
    positions = next((name for name in POSITION_ARGUMENTS if name in names and name != tokens), None)
    required = [p.name for p in params if p.default is p.empty and p.name not in (tokens, positions)]
    if required:
        raise ValueError(
            f"{type(model).__name__}.forward requires {required} besides the token ids ({tokens!r}); a decoder is "
            f"called with token ids [batch, seq] and, optionally, positions ({', '.join(POSITION_ARGUMENTS)})"
        )
    rank = POSITION_ARGUMENTS.get(positions, 2)
    param = next((p for p in params if p.name == positions), None)
    if param is not None and (param.annotation in (int, "int") or type(param.default) is int):
        rank = 0  # the position of the first token (`pos: int`, `pos=0`)
    return ForwardSignature(tokens, positions, rank)


def output_logits(out, model: nn.Module) -> torch.Tensor:
    """The logits in what `model` returned: the tensor itself, the first element of a tuple, or `.logits`."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        found = f"a tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"{type(model).__name__}.forward returned {found}: a decoder returns logits [batch, seq, vocab] (a "
            "float tensor, the first element of a tuple, or an object with .logits)"
        )
    return logits


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype that holds most of the module's parameter elements: what its activations compute in. Not
    the first parameter's, which a model that keeps, say, its embedding or norms in float32 beside bfloat16 linears
    would misreport (and the self-check would hold it to float32's tolerance)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point() and p.dtype.itemsize >= 2:  # float8 weights compute in a wider dtype
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:  # every weight quantized to integers, or no parameters: the default's
        return torch.get_default_dtype()
    return max(counts, key=counts.get)
