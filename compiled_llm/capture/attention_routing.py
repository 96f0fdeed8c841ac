"""Route every attention call of a Hugging Face model to the canonical `compiled_llm::attention` op.

transformers looks attention functions up by `config._attn_implementation` in its AttentionInterface
registry; registering one function there and pointing every config of the model at it catches all families
alike (SDPA, eager, soft-capped, sink-using), instead of pattern-matching each family's masks. Because our
name has no entry in transformers' mask registry, the model builds no attention mask either: the op knows
causality and the sliding window itself.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from compiled_llm.capture.latent_attention import routed_latent_attention

ATTENTION_IMPLEMENTATION = "compiled_llm"

# Keyword arguments HF passes to attention functions that carry no attention semantics.
_IGNORED_KWARGS = {"position_ids", "use_cache", "output_router_logits", "output_attentions", "cache_position"}


class CaptureError(RuntimeError):
    """The model could not be captured into one graph; the message names the architecture and the culprit."""


def canonical_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [1, Hq, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, Dv]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:  # ([1, T, Hq, Dv], no weights)
    where = type(module).__name__
    if attention_mask is not None:
        raise CaptureError(f"{where} received an attention mask built by the model; only causal masks are supported")
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise CaptureError(f"{where} is not causal (bidirectional attention is not supported)")
    if dropout:
        raise CaptureError(f"{where} uses attention dropout={dropout}; call model.eval() first")
    unknown = sorted(
        name for name, val in kwargs.items() if name not in _IGNORED_KWARGS and val is not None and val is not False
    )
    if unknown:
        raise CaptureError(f"{where} passes attention arguments the canonical op does not carry: {unknown}")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise CaptureError(f"{where} has no `layer_idx`; the paged KV cache needs one per attention layer")
    if query.shape[0] != 1:
        raise CaptureError(f"{where}: expected the flat token batch [1, heads, tokens, head_dim], got {tuple(query.shape)}")

    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    features = (int(sliding_window or 0), float(softcap or 0.0), s_aux)
    latent = routed_latent_attention(module)
    if latent is not None:  # multi-head latent attention, absorbed: it attends over the latents (latent_attention.py)
        return latent.attend(query, key, value, int(layer_idx), scale, *features), None
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    out = torch.ops.compiled_llm.attention(q, k, v, int(layer_idx), scale, *features)
    return out.unsqueeze(0), None


def model_configs(model: nn.Module) -> list:
    from transformers import PretrainedConfig

    configs: dict[int, PretrainedConfig] = {}
    pending = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while pending:
        config = pending.pop()
        if id(config) not in configs:
            configs[id(config)] = config
            pending += [getattr(config, key) for key in getattr(config, "sub_configs", {}) if getattr(config, key, None)]
    return list(configs.values())


@contextlib.contextmanager
def route_attention_to_canonical_op(model: nn.Module):
    """Within the block, every attention layer of `model` calls `compiled_llm::attention`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, canonical_attention_forward)
    configs = model_configs(model)
    saved = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = ATTENTION_IMPLEMENTATION
        yield
    finally:
        for config, old in zip(configs, saved):
            # The property setter recurses into sub-configs; restore each config's own value only.
            config.__dict__["_attn_implementation_internal"] = old
