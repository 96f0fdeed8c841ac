"""Route multi-head latent attention (DeepSeek-V2/V3's MLA) to the canonical op in its absorbed form.

MLA keeps, per token, one compressed vector c (`kv_lora_rank` wide, after its norm) and one RoPE key k_r shared by
every head. transformers expands them into per-head keys and values before attending (`expand_kv`, through
kv_b_proj = [W_uk; W_uv] per head). Absorbing those two halves into the query and the output attends over the
latents directly, with the same scores and the same output:

    q_h . [W_uk,h c ; k_r] = [W_uk,hᵀ q_nope,h ; q_rope,h] . [c ; k_r]        sum_s p_s W_uv,h c_s = W_uv,h sum_s p_s c_s

So each layer's attention is captured as

    q' = cat(q_nope @ W_uk, q_rope)            [T, H, r + rope]
    k' = cat(c, k_r)                           [T, 1, r + rope]   one key head, whose values are the keys themselves
    o  = compiled_llm.attention(q', k', k')[..., :r] @ W_uvᵀ       [T, H, v]

and insert_paged_attention gives a layer whose values are its keys a cache of one plane: r + rope values a token
(576 for DeepSeek-V3) instead of 2 x heads x head_dim (49,152 with V3's 128 heads, expanded and padded).

The seam is `expand_kv(kv_nope, k_rot)`, which every transformers MLA class calls on the latents after the norm and
RoPE: on each routed instance it returns the latents unexpanded, and `canonical_attention_forward` absorbs
kv_b_proj for them (`LatentAttention.attend`). A layer is routed only where its own forward and the absorbed one agree
on a probe (each layer, before the export); one whose kv_b_proj the absorption cannot read (quantized, biased, another
shape, hooked) keeps the expanded form, which is correct, and the log names why.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)

log = logging.getLogger("compiled_llm.capture")

FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)
PROBE_TOKENS = 5
# Relative RMS between the module's expanded forward and the absorbed one on the probe: the two round differently
# (16-bit: the absorbed query, not the expanded keys, is rounded), a wrong absorption differs by its whole size.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 0.03, torch.bfloat16: 0.05}

_ROUTED: dict[nn.Module, LatentAttention] = {}


@dataclass(frozen=True)
class LatentAttention:
    """One MLA module's shapes, and its attention computed over the latents."""

    module: nn.Module
    num_heads: int
    nope_dim: int  # qk_nope_head_dim
    rope_dim: int  # qk_rope_head_dim
    value_dim: int  # v_head_dim
    rank: int  # kv_lora_rank

    def _kv_b(self) -> torch.Tensor:  # [H, nope + v, r]: W_uk (first nope rows of each head), then W_uv
        return self.module.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.value_dim, self.rank)

    def attend(self, query, key, value, layer_idx: int, scale: float, window: int, softcap: float, sinks):
        """query [1, H, T, nope + rope] as transformers builds it, key = value = the latents [1, 1, T, r + rope] that
        `latent_expand_kv` returned -> the attention output [1, T, H, v], as an attention function returns it."""
        from compiled_llm.capture.attention_routing import CaptureError

        where = type(self.module).__name__
        latent_shape = (1, 1, query.shape[2], self.rank + self.rope_dim)
        if value is not key or tuple(key.shape) != latent_shape or query.shape[-1] != self.nope_dim + self.rope_dim:
            raise CaptureError(
                f"{where}: the absorbed latent attention expected query [1, H, T, {self.nope_dim + self.rope_dim}] and "
                f"the latents {list(latent_shape)} from expand_kv, got {tuple(query.shape)} and {tuple(key.shape)}"
            )
        kv_b = self._kv_b()
        q = query[0]  # [H, T, nope + rope]
        q_latent = torch.matmul(q[..., : self.nope_dim], kv_b[:, : self.nope_dim])  # [H, T, r]
        q_absorbed = torch.cat([q_latent, q[..., self.nope_dim :]], dim=-1).transpose(0, 1)  # [T, H, r + rope]
        latents = key[0].transpose(0, 1)  # [T, 1, r + rope]
        out = torch.ops.compiled_llm.attention(q_absorbed, latents, latents, layer_idx, scale, window, softcap, sinks)
        weighted = out[..., : self.rank].transpose(0, 1)  # [H, T, r]: the weighted sum of c
        return torch.matmul(weighted, kv_b[:, self.nope_dim :].transpose(1, 2)).transpose(0, 1).unsqueeze(0)


def routed_latent_attention(module: nn.Module) -> LatentAttention | None:
    """The absorbed form `module` attends in, where `route_latent_attention` routed it."""
    return _ROUTED.get(module)


def latent_expand_kv(kv_nope: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """expand_kv for a routed module: the latents [B, 1, T, r + rope], as keys and (the same tensor) values."""
    latents = torch.cat([kv_nope, k_rot], dim=-1)
    return latents, latents


def latent_form(module: nn.Module) -> tuple[LatentAttention | None, str]:
    """(the module's absorbed form, "") where its kv_b_proj can be absorbed, else (None, why)."""
    names = ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
    if not all(isinstance(getattr(module, name, None), int) for name in names):
        return None, f"none of {names} may be missing"
    heads, nope, rope, value, rank = (getattr(module, name) for name in names)
    kv_b = getattr(module, "kv_b_proj", None)
    if type(kv_b) is not nn.Linear:  # a quantized linear class holds its weight otherwise
        return None, f"kv_b_proj is a {type(kv_b).__name__}, not a torch.nn.Linear"
    # The absorbed form reads kv_b_proj's weight, not its call: whatever a call would add is refused.
    if kv_b._forward_hooks or kv_b._forward_pre_hooks or "forward" in vars(kv_b) or _global_module_hooks():
        return None, "kv_b_proj has forward hooks or a forward of its own"
    if "expand_kv" in vars(module):
        return None, "the module has an expand_kv of its own"
    if kv_b.weight.dtype not in FLOAT_WEIGHTS:
        return None, f"kv_b_proj's weight is {kv_b.weight.dtype}"
    if kv_b.bias is not None:
        return None, "kv_b_proj has a bias"
    if tuple(kv_b.weight.shape) != (heads * (nope + value), rank):
        return None, f"kv_b_proj's weight is {tuple(kv_b.weight.shape)}, not [{heads} x ({nope} + {value}), {rank}]"
    return LatentAttention(module, heads, nope, rope, value, rank), ""


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _rotary_embedding(model: nn.Module, module: nn.Module) -> nn.Module | None:
    """The model's RoPE module of `module`'s family (what its decoder passes as position_embeddings)."""
    family = type(module).__module__
    for candidate in model.modules():
        if type(candidate).__module__ == family and type(candidate).__name__.endswith("RotaryEmbedding"):
            return candidate
    return None


@torch.no_grad()
def _disagreement(model: nn.Module, latent: LatentAttention) -> str | None:
    """Why the module's own forward and the absorbed one differ on a probe (random hidden states, real RoPE), or
    None where they agree. Runs inside `route_attention_to_canonical_op`, so both attend through the same op."""
    module = latent.module
    rotary = _rotary_embedding(model, module)
    if rotary is None:
        return "no RoPE module of its family to probe it with"
    weight = module.kv_b_proj.weight
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, PROBE_TOKENS, model.config.hidden_size, generator=generator).to(weight)
    positions = torch.arange(PROBE_TOKENS, device=weight.device)[None]
    try:
        position_embeddings = rotary(hidden, positions)
        expected = module(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)[0]
        _ROUTED[module] = latent
        module.expand_kv = latent_expand_kv
        try:
            actual = module(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)[0]
        finally:
            del _ROUTED[module], module.expand_kv
    except Exception as error:  # noqa: BLE001  (a forward the probe cannot run is not one this absorbs)
        return f"its forward failed on the probe ({type(error).__name__}: {error})"
    error = float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))
    tolerance = PROBE_TOLERANCE.get(weight.dtype, 0.05)
    if not error <= tolerance:
        return f"its forward and the absorbed one differ on a probe (relative RMS {error:.3g} > {tolerance})"
    return None


@contextlib.contextmanager
def route_latent_attention(model: nn.Module, unrouted: dict[str, str] | None = None):
    """Within the block (entered inside `route_attention_to_canonical_op`), every MLA module of `model` that can be
    absorbed attends over its latents (module docstring); the others keep their expanded form, and `unrouted` (if
    given) gets each such class and why."""
    candidates = [m for m in model.modules() if callable(getattr(m, "expand_kv", None)) and hasattr(m, "kv_b_proj")]
    routed, skipped = [], {}
    for module in candidates:  # decided here, before the export: the probe must not be traced
        latent, why = latent_form(module)
        if latent is not None:  # every layer: a few tokens through one attention layer, twice
            why = _disagreement(model, latent) or ""
        if why:
            skipped[type(module).__name__] = why
        else:
            routed.append(latent)
    try:
        for latent in routed:
            _ROUTED[latent.module] = latent
            latent.module.expand_kv = latent_expand_kv
        yield
    finally:
        for latent in routed:
            _ROUTED.pop(latent.module, None)
            del latent.module.expand_kv
        if routed:
            kinds = sorted({type(latent.module).__name__ for latent in routed})
            log.info("%d attention layers (%s) attend over their latents (absorbed kv_b_proj)", len(routed), ", ".join(kinds))
        for name, why in skipped.items():
            log.info("%s keeps its expanded keys and values (latent attention not absorbed: %s)", name, why)
        if unrouted is not None:
            unrouted.update(skipped)

