"""Proof that an attention mask a module builds is the causal mask, so a pass may drop it.

The mask's subgraph may read constants, buffers, the number of tokens and the positions; it is evaluated
with T tokens at positions 0..T-1 for several T and compared, entry by entry, with "key j is seen by query
i iff j <= i" (over T keys, or over the rows of a module's own cache when it indexes one by position).
Anything else it reads (token ids, a padding mask) makes it unprovable. It is evaluated on the CPU (buffers
copied there, devices asked for replaced), so the model's device does not matter.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Literal

import torch
import torch.fx

aten = torch.ops.aten
# Token counts checked: 1 and 2 (decode, short prompts) export never sees; larger ones reach into tables.
CHECKED_COUNTS = (1, 2, 3, 7, 16)
LARGEST_CHECKED = 8192  # tokens: a float mask of 8192 x 8192 is 256 MiB


def evaluate(gm: torch.fx.GraphModule, node: torch.fx.Node, tokens: int, memo: dict):
    """The value of `node` for `tokens` tokens at positions 0..tokens-1; None if it reads another input."""
    if node in memo:
        return memo[node]
    token_count = str(next(n for n in gm.graph.nodes if n.target == "input_ids").meta["val"].shape[0])
    value = None
    if node.op == "get_attr":
        value = operator.attrgetter(node.target)(gm).cpu()  # evaluated on the CPU, whatever the model's device
    elif node.op == "placeholder" and node.target == "position_ids":
        value = torch.arange(tokens)
    elif node.op == "call_function" and node.target is aten.sym_size.int:
        value = tokens if str(node.meta.get("val")) == token_count else None
    elif node.op == "call_function" and node.target is aten.type_as.default:  # only the other's dtype is read
        value = evaluate(gm, node.args[0], tokens, memo)
        value = None if value is None else value.to(node.args[1].meta["val"].dtype)
    elif node.op == "call_function":
        missing = False

        def resolve(arg):
            nonlocal missing
            if isinstance(arg, torch.fx.Node):
                got = evaluate(gm, arg, tokens, memo)
                missing |= got is None
                return got
            if isinstance(arg, (list, tuple)):
                return type(arg)(resolve(a) for a in arg)
            return arg

        args = [resolve(a) for a in node.args]
        kwargs = {k: "cpu" if k == "device" else resolve(v) for k, v in node.kwargs.items()}
        if not missing:
            value = node.target(*args, **kwargs)
            if isinstance(value, torch.Tensor):
                value = value.cpu()
    memo[node] = value
    return value


def causal_mask_problem(gm: torch.fx.GraphModule, mask: torch.fx.Node, kind: Literal["masked", "attend", "additive"],
                        max_positions: int | None = None) -> str | None:  # fmt: skip
    """Why `mask` is not provably causal, or None. `kind`: what its entries mean; "masked": True hides the
    key (masked_fill); "attend": True shows it (an SDPA bool mask); "additive": 0 shows, -inf hides. Layers
    usually share one mask: each is proven once."""
    proofs = gm.meta.setdefault("mask_proofs", {})
    key = (mask.name, kind, max_positions)
    if key not in proofs:
        proofs[key] = _causal_mask_problem(gm, mask, kind, max_positions)
    return proofs[key]


def _causal_mask_problem(gm, mask, kind, max_positions) -> str | None:
    # Up to the longest sequence there can be: the position table's rows, else the runtime's max_seq_len
    # (a mask causal at 16 tokens may be a sliding window at 20), within what a mask of that size costs.
    largest = max_positions or min(gm.meta.get("max_seq_len") or 0, LARGEST_CHECKED) or None
    counts = sorted({n for n in CHECKED_COUNTS if largest is None or n <= largest} | ({largest} if largest else set()))
    for tokens in counts:
        try:
            value = evaluate(gm, mask, tokens, {})
        except Exception as error:  # e.g. a slice of a table shorter than `tokens`
            return f"its mask cannot be built for {tokens} tokens ({type(error).__name__}: {error})"
        if value is None:
            return "its mask depends on more than the number of tokens and their positions (token ids, padding)"
        value = value.cpu()
        if value.dim() < 2 or any(s != 1 for s in value.shape[:-2]) or value.shape[-2] != tokens:
            return f"its mask has shape {tuple(value.shape)} for {tokens} tokens"
        value = value.reshape(value.shape[-2:])
        keys = value.shape[-1]
        expected = torch.arange(keys)[None, :] <= torch.arange(tokens)[:, None]
        if kind == "additive":
            seen = value == 0
            causal = bool((seen == expected).all() and (value[~expected] == float("-inf")).all())
        else:
            seen = ~value.bool() if kind == "masked" else value.bool()
            causal = bool((seen == expected).all())
        if not causal:
            return f"its mask is not the causal mask for {tokens} tokens"
    return None


_TORCH_DIR = str(Path(torch.__file__).parent)


def user_line(node: torch.fx.Node) -> str:
    """The user's source line that made `node`, from the trace's stack: its innermost frame outside torch
    (a module's `self.gelu(x)`, not nn.GELU's own forward)."""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [(lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else "")
              for i, line in enumerate(lines) if line.lstrip().startswith("File ")]  # fmt: skip
    outside = [frame for frame in frames if _TORCH_DIR not in frame[0]]
    return " ".join((outside or frames or [("", "")])[-1]).strip()
