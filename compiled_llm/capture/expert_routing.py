"""Route the experts of a Hugging Face mixture-of-experts model to the canonical `compiled_llm::moe_experts` op.

transformers 5 picks an experts forward by `config._experts_implementation` in its ExpertsInterface registry
(`@use_experts_implementation` on each family's experts class); registering one function there, as the attention
routing does, gives one op per MoE layer in the captured graph, whatever the family, instead of pattern-matching
the sort, histogram and grouped-GEMM ops each implementation exports. The router (softmax or sigmoid, top-k,
renormalisation, grouped top-k) stays in the graph, the op takes its choices (fx_passes/fuse_moe_routing.py makes
the common routers one kernel).

Experts the op does not describe (an activation it lacks, a norm after each expert, expert parallelism) keep
transformers' `grouped_mm` forward, which is what they ran before: correct, named in the log, and counted in the
report's insert_fused_moe line.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from compiled_llm.capture.attention_routing import model_configs

log = logging.getLogger("compiled_llm.capture")

EXPERTS_IMPLEMENTATION = "compiled_llm"
CANONICAL_MOE = torch.ops.compiled_llm.moe_experts.default


def experts_activation(module: nn.Module) -> tuple[str | None, tuple[float, ...], str]:
    """(the op's activation name, its parameters, "") where `moe_experts` computes `module`'s experts exactly, else
    (None, (), why). An experts class with a gated activation of its own gets one of the op's only where the two
    agree on a probe (values past any clamp), in float32: a look-alike is refused, never guessed."""
    from transformers.activations import SiLUActivation
    from transformers.integrations import moe

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


class _ExpertsForward:
    """The registered experts function: the canonical op where it describes the module, else `fallback`."""

    def __init__(self, fallback, activations: dict[int, tuple]):
        self.fallback = fallback
        self.activations = activations  # id(experts module) -> experts_activation(module)
        self.unrouted: dict[str, str] = {}  # experts class -> why it kept transformers' forward

    def __call__(self, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        # Decided before the export (experts_activation runs a probe, which must not be traced).
        activation, params, why = self.activations.get(id(module), (None, (), "not found before the export"))
        if activation is None:
            self.unrouted[type(module).__name__] = why
            return self.fallback(module, hidden_states, top_k_index, top_k_weights)
        w13, w2, b13, b2 = expert_weights(module)
        return torch.ops.compiled_llm.moe_experts(
            hidden_states, top_k_index, top_k_weights, w13, w2, b13, b2, activation, list(params), "torch"
        )


@contextlib.contextmanager
def route_experts_to_canonical_op(model: nn.Module, unrouted: dict[str, str] | None = None):
    """Within the block, every experts module of `model` the op describes calls `compiled_llm::moe_experts`; the
    others run transformers' `grouped_mm` forward, and `unrouted` (if given) gets each such class and why."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
    except ImportError:  # a transformers without the experts registry: its experts stay as they are
        yield
        return
    experts = [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "gate_up_proj")]
    forward = _ExpertsForward(grouped_mm_experts_forward, {id(m): experts_activation(m) for m in experts})
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, forward)
    configs = [c for c in model_configs(model) if hasattr(c, "_experts_implementation")]
    saved = [c.__dict__.get("_experts_implementation_internal", c._experts_implementation) for c in configs]
    try:
        for config in configs:
            config.__dict__["_experts_implementation_internal"] = EXPERTS_IMPLEMENTATION
        yield
    finally:
        for config, old in zip(configs, saved):
            config.__dict__["_experts_implementation_internal"] = old
        for name, why in forward.unrouted.items():
            log.info(
                "%s keeps transformers' grouped_mm experts (compiled_llm::moe_experts does not take %s)", name, why
            )
        if unrouted is not None:
            unrouted.update(forward.unrouted)
