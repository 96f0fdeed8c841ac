"""`compiled_llm::moe_route`: an MoE router's choice from its logits, in one kernel where Inductor writes a softmax, a
top-k (a library call) and the renormalisation apart.

    weights, ids = moe_route(logits [T, E], k, scoring, renormalize, scale, weights_dtype, backend)

scoring "softmax": p = softmax(float32(logits)); (v, ids) = topk(p, k); v /= sum(v) where `renormalize` (Qwen3-MoE,
Mixtral, OLMoE; DeepSeek-V2's greedy routing without it). "topk_softmax": (v, ids) = topk(logits, k); v =
softmax(float32(v)) (GPT-OSS). Then v * scale (DeepSeek's routed_scaling_factor; 1.0 elsewhere, and then no multiply),
in `weights_dtype`. The reference is those torch ops; ties between equal scores may pick either expert in any backend,
as torch.topk's own order among equals is unspecified.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import KERNEL_DTYPES, pdl_launch_options, triton_runs_on

SCORINGS = ("softmax", "topk_softmax")

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "moe_route(Tensor logits, int top_k, str scoring, bool renormalize, float scale, ScalarType weights_dtype, "
    "str backend) "
    "-> (Tensor, Tensor)"
)


def moe_route_reference(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool, scale: float,
                        weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if scoring == "softmax":
        values, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if renormalize:
            values = values / values.sum(dim=-1, keepdim=True)
    else:
        values, ids = torch.topk(logits, top_k, dim=-1)
        values = torch.softmax(values.float(), dim=-1)
    if scale != 1.0:
        values = values * scale
    return values.to(weights_dtype), ids


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def moe_route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_l, scale, BLOCK_E: tl.constexpr, K: tl.constexpr,
                         BLOCK_K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
                         SCALE: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
        if USE_PDL:  # (triton_runtime) every input is the router's output: nothing to load before the wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, BLOCK_E)
        scores = tl.load(logits_ptr + row * stride_l + experts, mask=experts < E, other=float("-inf")).to(tl.float32)
        if SOFTMAX_FIRST:
            exps = tl.exp(scores - tl.max(scores, axis=0))
            scores = exps / tl.sum(exps, axis=0)
            scores = tl.where(experts < E, scores, float("-inf"))
        slots = tl.arange(0, BLOCK_K)
        values = tl.zeros((BLOCK_K,), dtype=tl.float32)
        ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for j in tl.static_range(K):  # the largest left, k times: k is a router's 1 to 8
            best = tl.max(scores, axis=0)
            pick = tl.min(tl.where(scores == best, experts, BLOCK_E), axis=0)  # the lowest index among equals
            values = tl.where(slots == j, best, values)
            ids = tl.where(slots == j, pick, ids)
            scores = tl.where(experts == pick, float("-inf"), scores)
        chosen = slots < K
        if SOFTMAX_FIRST:
            if RENORMALIZE:
                values = values / tl.sum(tl.where(chosen, values, 0.0), axis=0)
        else:
            exps = tl.where(chosen, tl.exp(values - tl.max(tl.where(chosen, values, float("-inf")), axis=0)), 0.0)
            values = exps / tl.sum(exps, axis=0)
        if SCALE:
            values = values * scale
        tl.store(weights_ptr + row * K + slots, values.to(weights_ptr.dtype.element_ty), mask=chosen)
        tl.store(ids_ptr + row * K + slots, ids, mask=chosen)

    return moe_route_kernel


def _triton_route(logits, top_k: int, scoring: str, renormalize: bool, scale: float, weights_dtype: torch.dtype):
    import triton

    if not (triton_runs_on(logits) and logits.dtype in KERNEL_DTYPES and logits.stride(-1) == 1 and top_k <= 16):
        return moe_route_reference(logits, top_k, scoring, renormalize, scale, weights_dtype)
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, device=logits.device, dtype=weights_dtype)
    ids = torch.empty(tokens, top_k, device=logits.device, dtype=torch.int64)
    if tokens:
        _kernel()[(tokens,)](
            logits, weights, ids, experts, logits.stride(0), float(scale), BLOCK_E=triton.next_power_of_2(experts),
            K=top_k, BLOCK_K=triton.next_power_of_2(top_k), SOFTMAX_FIRST=scoring == "softmax",
            RENORMALIZE=renormalize, SCALE=scale != 1.0, **pdl_launch_options(logits),
        )  # fmt: skip
    return weights, ids


ROUTE_BACKENDS = {"torch": moe_route_reference, "triton": _triton_route}


def _moe_route(logits, top_k, scoring, renormalize, scale, weights_dtype, backend):
    return ROUTE_BACKENDS[backend](logits, top_k, scoring, renormalize, scale, weights_dtype)


def _moe_route_fake(logits, top_k, scoring, renormalize, scale, weights_dtype, backend):
    shape = (*logits.shape[:-1], top_k)
    return logits.new_empty(shape, dtype=weights_dtype), logits.new_empty(shape, dtype=torch.int64)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("moe_route", _moe_route, _device)
torch.library.register_fake("compiled_llm::moe_route", _moe_route_fake, lib=_LIBRARY)


# -- grouped routing (the experts of the best groups only: DeepSeek-V3's and V2's group_limited_greedy routers) -----

GROUPED_SCORINGS = ("sigmoid", "softmax")
_LIBRARY.define(
    "moe_route_grouped(Tensor logits, Tensor? bias, int top_k, str scoring, int num_groups, int topk_groups, "
    "bool renormalize, float scale, ScalarType weights_dtype, str backend) -> (Tensor, Tensor)"
)


def check_grouped_routing(experts: int, top_k: int, num_groups: int, topk_groups: int, scoring: str,
                          has_bias: bool = False) -> None:  # fmt: skip
    """The routings moe_route_grouped computes: whole groups of two experts at least, k of the kept groups' experts,
    a correction bias with sigmoid scores only (transformers' softmax router has none)."""
    if scoring not in GROUPED_SCORINGS:
        raise ValueError(f"moe_route_grouped: scoring {scoring!r}, not one of {', '.join(GROUPED_SCORINGS)}")
    if has_bias and scoring != "sigmoid":
        raise ValueError(f"moe_route_grouped: a correction bias goes with scoring 'sigmoid', not {scoring!r}")
    if num_groups < 1 or experts % num_groups or experts // num_groups < 2 or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"moe_route_grouped: {experts} experts in num_groups={num_groups} groups of 2 or more, "
                         f"topk_groups={topk_groups} of them")  # fmt: skip
    if not 1 <= top_k <= topk_groups * (experts // num_groups):
        raise ValueError(f"moe_route_grouped: top_k={top_k} of the {topk_groups * (experts // num_groups)} experts "
                         f"in the kept groups")  # fmt: skip


def moe_route_grouped_reference(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scoring: str,
                                num_groups: int, topk_groups: int, renormalize: bool, scale: float,
                                weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A grouped router after its linear, op for op as transformers writes it. "sigmoid" (DeepseekV3TopkRouter):
    s = sigmoid(logits); the experts are chosen by s + bias among the `topk_groups` groups (of `num_groups` equal,
    contiguous ones) whose two best sum highest; their weights are s, renormalised (over a sum + 1e-20). "softmax"
    (DeepseekV2TopkRouter's group_limited_greedy): s = softmax(logits); groups ranked by their best; the other groups'
    scores 0. Then times `scale`."""
    check_grouped_routing(logits.shape[-1], top_k, num_groups, topk_groups, scoring, bias is not None)
    tokens, experts = logits.shape
    if scoring == "softmax":
        scores = logits.float().softmax(dim=-1)
        choice = scores
        group_scores = scores.view(tokens, num_groups, experts // num_groups).max(dim=-1).values
    else:
        scores = logits.float().sigmoid()
        choice = scores + bias if bias is not None else scores
        group_scores = choice.view(tokens, num_groups, experts // num_groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_ids = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(tokens, num_groups, experts // num_groups).reshape(tokens, experts)
    choice = choice.masked_fill(~expert_mask.bool(), 0.0 if scoring == "softmax" else float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * scale).to(weights_dtype), ids


@functools.cache
def _grouped_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def moe_route_grouped_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_l, scale, G: tl.constexpr,
                                 GS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr, K: tl.constexpr,
                                 BLOCK_K: tl.constexpr, TOPK_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 RENORMALIZE: tl.constexpr, SOFTMAX: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
        """One token's routing, its experts as a [group, expert of the group] tile. Ties go to the lowest index."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        groups = tl.arange(0, BLOCK_G)[:, None]
        members = tl.arange(0, BLOCK_GS)[None, :]
        valid = (groups < G) & (members < GS)
        experts = groups * GS + members
        logits = tl.load(logits_ptr + row * stride_l + experts, mask=valid, other=0.0).to(tl.float32)
        # Padding slots zeroed: with groups off a power of two, a padding slot's index is the next group's member's.
        if SOFTMAX:
            exps = tl.where(valid, tl.exp(logits - tl.max(tl.max(tl.where(valid, logits, float("-inf")), 1), 0)), 0.0)
            scores = exps / tl.sum(tl.sum(exps, axis=1), axis=0)
        else:
            scores = tl.where(valid, tl.sigmoid(logits), 0.0)
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, float("-inf"))
        # each group's two best choices, summed: the best, then the best of the rest (its lowest index taken out)
        best = tl.max(choice, axis=1)
        first = tl.min(tl.where(choice == best[:, None], members, BLOCK_GS), axis=1)
        second = tl.max(tl.where(members == first[:, None], float("-inf"), choice), axis=1)
        group_scores = tl.where(tl.arange(0, BLOCK_G) < G, best if SOFTMAX else best + second, float("-inf"))
        kept = tl.zeros((BLOCK_G,), dtype=tl.int1)
        group_ids = tl.arange(0, BLOCK_G)
        for _ in tl.static_range(TOPK_GROUPS):
            top = tl.max(group_scores, axis=0)
            pick = tl.min(tl.where(group_scores == top, group_ids, BLOCK_G), axis=0)
            kept = kept | (group_ids == pick)
            group_scores = tl.where(group_ids == pick, float("-inf"), group_scores)
        # (softmax: transformers scores the other groups 0, not -inf; every kept score is above 0 but for an
        # underflow, whose weight is 0 whichever expert it names)
        choice = tl.where(kept[:, None], choice, float("-inf"))
        slots = tl.arange(0, BLOCK_K)
        values = tl.zeros((BLOCK_K,), dtype=tl.float32)
        ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for j in tl.static_range(K):
            top = tl.max(tl.max(choice, axis=1), axis=0)
            pick = tl.min(tl.min(tl.where((choice == top) & valid, experts, G * GS), axis=1), axis=0)
            weight = tl.sum(tl.sum(tl.where(experts == pick, scores, 0.0), axis=1), axis=0)
            values = tl.where(slots == j, weight, values)
            ids = tl.where(slots == j, pick, ids)
            choice = tl.where(experts == pick, float("-inf"), choice)
        chosen = slots < K
        if RENORMALIZE:
            values = values / (tl.sum(tl.where(chosen, values, 0.0), axis=0) + 1e-20)
        values = values * scale
        tl.store(weights_ptr + row * K + slots, values.to(weights_ptr.dtype.element_ty), mask=chosen)
        tl.store(ids_ptr + row * K + slots, ids, mask=chosen)

    return moe_route_grouped_kernel


def _triton_route_grouped(logits, bias, top_k, scoring, num_groups, topk_groups, renormalize, scale, weights_dtype):
    import triton

    tokens, experts = logits.shape
    check_grouped_routing(experts, top_k, num_groups, topk_groups, scoring, bias is not None)
    group_size = experts // num_groups
    runs = triton_runs_on(logits) and logits.dtype in KERNEL_DTYPES and logits.stride(-1) == 1 and top_k <= 16
    if not (runs and topk_groups <= 16 and (bias is None or bias.is_contiguous())):
        return moe_route_grouped_reference(logits, bias, top_k, scoring, num_groups, topk_groups, renormalize, scale,
                                           weights_dtype)  # fmt: skip
    weights = torch.empty(tokens, top_k, device=logits.device, dtype=weights_dtype)
    ids = torch.empty(tokens, top_k, device=logits.device, dtype=torch.int64)
    if tokens:
        _grouped_kernel()[(tokens,)](
            logits, bias if bias is not None else logits, weights, ids, logits.stride(0), float(scale), G=num_groups,
            GS=group_size, BLOCK_G=triton.next_power_of_2(num_groups), BLOCK_GS=triton.next_power_of_2(group_size),
            K=top_k, BLOCK_K=triton.next_power_of_2(top_k), TOPK_GROUPS=topk_groups, HAS_BIAS=bias is not None,
            RENORMALIZE=renormalize, SOFTMAX=scoring == "softmax", **pdl_launch_options(logits),
        )  # fmt: skip
    return weights, ids


GROUPED_ROUTE_BACKENDS = {"torch": moe_route_grouped_reference, "triton": _triton_route_grouped}


def _moe_route_grouped(logits, bias, top_k, scoring, num_groups, topk_groups, renormalize, scale, weights_dtype,
                       backend):  # fmt: skip
    return GROUPED_ROUTE_BACKENDS[backend](logits, bias, top_k, scoring, num_groups, topk_groups, renormalize, scale,
                                           weights_dtype)  # fmt: skip


def _moe_route_grouped_fake(logits, bias, top_k, scoring, num_groups, topk_groups, renormalize, scale, weights_dtype,
                            backend):  # fmt: skip
    return _moe_route_fake(logits, top_k, scoring, renormalize, scale, weights_dtype, backend)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("moe_route_grouped", _moe_route_grouped, _device)
torch.library.register_fake("compiled_llm::moe_route_grouped", _moe_route_grouped_fake, lib=_LIBRARY)
