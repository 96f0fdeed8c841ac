"""Route grouped routers (the best groups of experts first: DeepSeek-V3's sigmoid scores with a bias correction,
DeepSeek-V2's group_limited_greedy softmax) to the canonical `compiled_llm::moe_route_grouped` op.

transformers writes that router as some fifteen ops (a sigmoid, two top-ks, a scatter, masks, a gather, the
renormalisation); exported, they are Inductor's to fuse and a pattern for a pass to match op by op. Here each such
router module's forward is replaced during the export by its linear and the one op, so the captured graph holds one
call a layer, whose backend fx_passes/fuse_moe_routing.py picks (one Triton kernel on GPUs).

A router is routed only where the op computes what its own forward does: the module must hold the attributes that
name the routing (top_k, num_group, topk_group, routed_scaling_factor, and e_score_correction_bias with norm_topk_prob
or topk_method "group_limited_greedy"), and copies of it, given random weights and biases, must return the canonical
logits and choose the same experts with the same float32 weights as the op on probes: logits of a trained router's spread (a saturated sigmoid would hide how
dropped groups are masked) and biases that leave the kept groups' choices negative as well as positive. Any other
router keeps its forward (named in the log), and so does one with a forward of its own on the instance (a hook's).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

import custom_ops  # noqa: F401  (registers torch.ops.compiled_llm)
from compiled_llm.capture.expert_routing import instance_forwards
from custom_ops.moe.routing import check_grouped_routing, moe_route_grouped_reference

log = logging.getLogger("compiled_llm.capture")

_V3_ATTRIBUTES = ("top_k", "num_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
_V2_ATTRIBUTES = ("top_k", "num_group", "topk_group", "routed_scaling_factor")


def _routing(module: nn.Module) -> tuple | None:
    """(top_k, scoring, groups, topk_groups, renormalize, scale, bias): the op's arguments for `module`, or None where
    it is not a grouped router whose attributes are numbers (A.X-K2-Light's routers leave the groups None)."""
    if hasattr(module, "e_score_correction_bias"):  # DeepSeek-V3's kind
        values = [getattr(module, name, None) for name in _V3_ATTRIBUTES]
        scoring, bias = "sigmoid", module.e_score_correction_bias
    elif getattr(module, "topk_method", None) == "group_limited_greedy":  # DeepSeek-V2's grouped kind
        values = [getattr(module, name, None) for name in _V2_ATTRIBUTES]
        values.insert(3, False)  # no renormalisation
        scoring, bias = "softmax", None
    else:
        return None
    if not all(isinstance(v, (int, float)) for v in values):
        return None
    top_k, groups, topk_groups, renormalize, scale = values
    return int(top_k), scoring, int(groups), int(topk_groups), bool(renormalize), float(scale), bias


def _canonical_forward(module: nn.Module):
    """`module`'s forward as its linear and the op: hidden_states -> (router_logits, weights, ids), as it returns."""
    top_k, scoring, groups, topk_groups, renormalize, scale, _ = _routing(module)

    def forward(hidden_states: torch.Tensor):
        hidden_states = hidden_states.view(-1, module.weight.shape[1])
        logits = F.linear(hidden_states.type(torch.float32), module.weight.type(torch.float32))
        bias = module.e_score_correction_bias if scoring == "sigmoid" else None
        weights, ids = torch.ops.compiled_llm.moe_route_grouped(
            logits, bias, top_k, scoring, groups, topk_groups, renormalize, scale, torch.float32, "torch"
        )
        return logits, weights, ids

    return forward


@torch.no_grad()
def grouped_router_mismatch(module: nn.Module) -> str | None:
    """None where the op computes `module`'s routing (probes on copies with random weights and biases), else why not."""
    routing = _routing(module)
    weight = getattr(module, "weight", None)
    if routing is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "not a grouped router"
    if "forward" in vars(module):
        return "a forward of its own on the instance (a hook's)"
    experts, hidden = weight.shape
    top_k, scoring, groups, topk_groups, renormalize, scale, bias = routing
    if scoring == "sigmoid" and (not isinstance(bias, torch.Tensor) or bias.shape != (experts,)):
        return f"a bias of shape {tuple(getattr(bias, 'shape', ()))} for {experts} experts"
    try:
        check_grouped_routing(experts, top_k, groups, topk_groups, scoring)
    except ValueError as error:
        return str(error)
    generator = torch.Generator().manual_seed(0)
    for bias_mean in (0.0, -1.0, 1.0):  # choices of both signs in the kept groups: how dropped ones are masked shows
        probe = copy.deepcopy(module).to("cpu")
        probe.weight.copy_(torch.randn(experts, hidden, generator=generator) * hidden**-0.5)
        probe_bias = None
        if scoring == "sigmoid":
            probe_bias = probe.e_score_correction_bias
            probe_bias.copy_(torch.randn(experts, generator=generator) * 0.1 + bias_mean)
        x = torch.randn(32, hidden, generator=generator).to(weight.dtype)
        try:
            logits, weights, ids = probe(x)
        except Exception as error:  # noqa: BLE001  (a forward that cannot take the probe is not one the op computes)
            return f"its forward fails on a probe ({type(error).__name__})"
        if weights.dtype != torch.float32 or not torch.equal(logits, F.linear(x.float(), probe.weight.float())):
            return "its logits or weights are not the op's (float32, from its weight)"
        expected_weights, expected_ids = moe_route_grouped_reference(
            logits, probe_bias, top_k, scoring, groups, topk_groups, renormalize, scale, torch.float32
        )
        ours, theirs = expected_ids.sort(dim=-1), ids.sort(dim=-1)
        if not torch.equal(ours.values, theirs.values):
            return "it chooses other experts than the op on a probe"
        if not torch.allclose(expected_weights.gather(1, ours.indices), weights.gather(1, theirs.indices), 1e-6, 1e-7):
            return "it weighs its experts otherwise than the op on a probe"
    return None


@contextlib.contextmanager
def route_grouped_routers(model: nn.Module):
    """Within the block, each router of `model` that moe_route_grouped computes calls it (its forward replaced on the
    instance); the others run as they did. Decided before the export: the probes must not be traced."""
    candidates = [m for m in model.modules() if hasattr(m, "topk_group") and (
        hasattr(m, "e_score_correction_bias") or getattr(m, "topk_method", None) == "group_limited_greedy")]  # fmt: skip
    decisions = {m: grouped_router_mismatch(m) for m in candidates}
    try:
        with instance_forwards({m: _canonical_forward(m) for m, why in decisions.items() if why is None}):
            yield
    finally:
        for name, why in {type(m).__name__: why for m, why in decisions.items() if why is not None}.items():
            log.info("%s keeps its own routing (compiled_llm::moe_route_grouped: %s)", name, why)
