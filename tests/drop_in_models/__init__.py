"""Small decoders written the way popular codebases write them, for the drop-in tests (random weights).

Each module keeps its codebase's idioms on purpose (signatures, position handling, attention, outputs,
caches): they are what a user hands to `compile_model` unchanged.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from drop_in_models.gptfast import gptfast, gptfast_greedy
from drop_in_models.meta_llama import meta_greedy, meta_llama
from drop_in_models.mingpt import mingpt
from drop_in_models.nanogpt import nanogpt

__all__ = ["gptfast", "gptfast_greedy", "meta_greedy", "meta_llama", "mingpt", "naive_greedy", "nanogpt"]


@torch.no_grad()
def naive_greedy(model: nn.Module, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by re-running the full module on the whole sequence each step (positions from 0
    where it takes them: gpt-fast's input_pos, Meta's start_pos)."""
    params = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    tokens = list(prompt)
    for _ in range(new):
        ids = torch.tensor([tokens], device=device)
        if "input_pos" in params:
            out = model(ids, input_pos=torch.arange(len(tokens), device=device))
        elif "start_pos" in params:
            out = model(ids, start_pos=0)
        else:
            out = model(ids)
        logits = out[0] if isinstance(out, tuple) else out
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]
