"""How long a sequence a compiled model may run: the model's trained context (RoPE scaling counted as vLLM
counts it), the rows of the position tables its positions index, and what the user asked for."""

from __future__ import annotations

import torch
from torch import nn

from compiled_llm.capture import text_config


def max_seq_len_for(model: nn.Module, asked: int | None) -> int:
    """max_seq_len, or the model's context where not given (2048 where its config names none)."""
    trained = context_length(text_config(model))
    if asked is not None and trained is not None and asked > trained:
        # As vLLM: positions past the trained ones give fluent-looking nonsense, not an error.
        raise ValueError(
            f"max_seq_len={asked} exceeds the model's context of {trained} positions (max_position_embeddings, "
            f"times the factor of a linear, dynamic or YaRN RoPE scaling): the largest max_seq_len that works is {trained}"
        )
    return asked or int(trained or 2048)



def bounded_by_position_tables(max_seq_len: int, asked: int | None, gm: torch.fx.GraphModule) -> int:
    """max_seq_len within the rows of the tables positions index (`runtime_positions` records them): a
    position past a learned table would read outside it."""
    if gm.meta.get("last_position_only"):
        raise ValueError("the module returns its last position's logits only: the select_logits_rows pass must run")
    rows = gm.meta.get("max_positions")
    if rows is None or max_seq_len <= rows:
        return max_seq_len
    if asked is not None:
        raise ValueError(
            f"max_seq_len={asked} exceeds the {rows} rows of the model's position table (a learned position "
            f"embedding or a precomputed RoPE table): the largest max_seq_len that works is {rows}"
        )
    return rows


def context_length(config) -> int | None:
    """max_position_embeddings, extended by RoPE scaling where the config gives the unscaled length (as vLLM
    derives max_model_len; llama3 and longrope configs give the extended length already)."""
    positions = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not positions or not isinstance(rope, dict):
        return positions
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if kind not in ("linear", "dynamic", "yarn") or not factor:
        return positions
    base = rope.get("original_max_position_embeddings") or positions if kind == "yarn" else positions
    return int(base * factor)
