"""Route the experts of a Hugging Face mixture-of-experts model to the canonical `compiled_llm::moe_experts` op.

transformers 5 gives every family's experts one shape (`@use_experts_implementation`: gate_up_proj [E, 2I, H],
down_proj [E, H, I], called with the router's (ids, weights)); replacing each such module's forward during the
export gives one op per MoE layer in the captured graph, whatever the family, instead of pattern-matching the sort,
histogram and grouped-GEMM ops each implementation exports. The router (softmax or sigmoid, top-k,
renormalisation, grouped top-k) stays in the graph, the op takes its choices (fx_passes/fuse_moe_routing.py makes
the common routers one kernel).

Experts the op does not describe (an activation it lacks, a norm after each expert, expert parallelism, transformers'
own FP8 experts) keep their forward, which is what they ran before: correct, and named in the log.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)

log = logging.getLogger("compiled_llm.capture")

FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)


def experts_activation(module: nn.Module) -> tuple[str | None, tuple[float, ...], str]:
    """(the op's activation name, its parameters, "") where `moe_experts` computes `module`'s experts exactly, else
    (None, (), why). An experts class with a gated activation of its own gets one of the op's only where the two
    agree on a probe (values past any clamp), in float32: a look-alike is refused, never guessed."""
    from transformers.activations import SiLUActivation
    from transformers.integrations import moe

    dtypes = {getattr(module, name, None).dtype for name in ("gate_up_proj", "down_proj") if hasattr(module, name)}
    if not dtypes <= set(FLOAT_WEIGHTS) or len(dtypes) != 1:
        return None, (), f"weights in {sorted(map(str, dtypes))} (a quantized experts class)"
    if getattr(module, "_is_expert_parallel", False):
        return None, (), "expert parallel"
    if getattr(module, "has_post_expert_norm", False):
        return None, (), "a norm after each expert"
    if not getattr(module, "has_gate", True):
        return None, (), "experts without a gate projection"
    if getattr(type(module), "_apply_gate", None) is not getattr(moe, "_default_apply_gate", None):
        for name, params in _own_gate_candidates(module):
            if _agrees_on_a_probe(module, name, params):
                return name, params, ""
        return None, (), f"its own gated activation ({type(module).__name__}._apply_gate)"
    if not getattr(module, "is_concatenated", True):
        return None, (), "interleaved gate/up rows"
    if not isinstance(getattr(module, "act_fn", None), (SiLUActivation, nn.SiLU)):
        return None, (), f"activation {type(getattr(module, 'act_fn', None)).__name__}"
    return "silu", (), ""


def _own_gate_candidates(module: nn.Module) -> list[tuple[str, tuple[float, ...]]]:
    found = []
    if not getattr(module, "is_concatenated", True) and hasattr(module, "alpha") and hasattr(module, "limit"):
        found.append(("swiglu_oai", (float(module.alpha), float(module.limit))))  # GPT-OSS
    return found


@torch.no_grad()
def _agrees_on_a_probe(module: nn.Module, name: str, params: tuple[float, ...]) -> bool:
    from custom_ops.moe.op import ACTIVATIONS

    probe = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 4 * max((1.0, *params))
    try:
        expected = module._apply_gate(probe)
    except Exception:  # noqa: BLE001  (a gate that cannot take the probe is not one of ours)
        return False
    actual = ACTIVATIONS[name](probe, params)
    return expected.shape == actual.shape and torch.allclose(actual, expected, rtol=1e-6, atol=1e-6)


def expert_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(w13 [E, 2I, H], w2 [E, H, I], b13, b2) as the op takes them: transposed storage as a view."""
    w13, w2 = module.gate_up_proj, module.down_proj
    if getattr(module, "is_transposed", False):
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    if getattr(module, "has_bias", False):
        return w13, w2, module.gate_up_proj_bias, module.down_proj_bias
    return w13, w2, None, None


def _canonical_forward(module: nn.Module, activation: str, params: tuple[float, ...]):
    """`module`'s forward as the canonical op: (hidden_states [T, H], ids [T, k], weights [T, k]) -> [T, H]."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        w13, w2, b13, b2 = expert_weights(module)
        return torch.ops.compiled_llm.moe_experts(
            hidden_states, top_k_index, top_k_weights, w13, w2, b13, b2, activation, list(params), "torch"
        )

    return forward


@contextlib.contextmanager
def instance_forwards(forwards: dict):
    """Within the block, each module of `forwards` calls the forward given for it (set on the instance, where the
    export's trace finds it first, and removed after)."""
    try:
        for module, forward in forwards.items():
            module.forward = forward
        yield
    finally:
        for module in forwards:
            vars(module).pop("forward", None)


@contextlib.contextmanager
def route_experts_to_canonical_op(model: nn.Module, unrouted: dict[str, str] | None = None):
    """Within the block, every experts module of `model` the op describes calls `compiled_llm::moe_experts` (its
    forward replaced on the instance: the configs' experts implementation, which other experts classes such as
    transformers' FP8 ones read from registries of their own, is left alone); the others run as they did, and
    `unrouted` (if given) gets each such class and why."""
    # transformers' experts classes (@use_experts_implementation): `has_gate` set, `gate_up_proj` held. Decided here,
    # before the export: experts_activation runs a probe, which must not be traced.
    experts = [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "gate_up_proj")]
    decisions = {m: experts_activation(m) for m in experts}
    routed = [m for m, (activation, _, _) in decisions.items() if activation is not None]
    skipped = {type(m).__name__: why for m, (activation, _, why) in decisions.items() if activation is None}
    forwards = {m: _canonical_forward(m, *decisions[m][:2]) for m in routed}
    try:
        with instance_forwards(forwards):
            yield
    finally:
        for name, why in skipped.items():
            log.info("%s keeps transformers' experts forward (compiled_llm::moe_experts does not take %s)", name, why)
        if unrouted is not None:
            unrouted.update(skipped)
