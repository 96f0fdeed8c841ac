"""The self-check of a drop-in compile: the rewritten, compiled graph against the user's own module.

Rewriting a module written outside Hugging Face relies on recognising what its code means (where positions
come from, which op is attention, which rows become logits); a module that means something else must fail
here, not answer wrongly later. Two short random prompts run through the paged runtime twice:

- in one step together (one flat batch of two sequences), every position's logits;
- as prefill of their first tokens, then one token per step (incremental decode over the KV cache);

and every position's logits are held against the module's own forward on that prefix, in its own dtype (its
linears rounded to float8 where `quantization="fp8"` rewrote them):
the largest difference may be `TOLERANCE[dtype]` times the largest logit magnitude (at least 1), and the
greedy token must be the module's wherever its best two logits are further apart than that. A graph whose
activations are rounded to FP8 is held by each position's RMS difference instead, relative to what quantizing does
to this model (QUANTIZED_ALLOWANCE); with float32 or wider activations one position of each run may take a rounding
flip (FLIP_ALLOWANCE) while the others are also held on average (WIDE_MEAN_ALLOWANCE).
"""

from __future__ import annotations

import contextlib
import logging
from typing import NoReturn

import torch

from compiled_llm.capture.forward_signature import compute_dtype
from compiled_llm.runtime import ScheduledChunk, Sequence
from fx_passes.causal_mask import user_line
from fx_passes.keep_gguf_int8_blocks import int8_block_module
from fx_passes.quantize_fp8 import quantized_module
from fx_passes.quantize_int4 import int4_module
from fx_passes.quantize_int8 import int8_module
from fx_passes.quantize_nvfp4 import nvfp4_module

log = logging.getLogger("compiled_llm")

# Of the largest |logit|: float32 keeps Inductor's reordered sums; 16-bit types round every activation.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 6e-2, torch.float16: 1e-2}
# With FP8 activations the graph and the reference each round activations to e4m3 at their own values: where a
# 16-bit rounding ahead of that differs, an activation moves by a whole e4m3 step, and a deep network amplifies it.
# On random weights in the Llama-3.1-8B shape (H200, benchmarks/fp8_self_check_error.py) a correct FP8 graph is 10%
# (2 layers), 18% (8) and 34% (32) from its reference in relative RMS, while the reference itself is 16%, 29% and
# 47% from the unquantized module. So each position's RMS difference may be QUANTIZED_ALLOWANCE times the largest
# relative RMS distance between the reference and the unquantized module (at least twice TOLERANCE): a wrong graph
# (uncorrelated logits, ~141%) fails, and a model that quantizing barely moves (trained weights) is held tighter.
QUANTIZED_ALLOWANCE = 1.0
QUANTIZED_FLOOR_FACTOR = 2.0
# With float32 or wider activations the graph's values and the reference's differ only by summation order or a RoPE
# table computed another way, so an FP8 rounding flips rarely: a correct graph equals its reference at most positions
# and, where a flip lands on a large activation, is far off at one (SmolLM2-135M's real weights on 1 CPU thread: 13
# of 20 positions equal, one at 1.10x the bound above, its run's other positions at 0.13x on average). A wrong weight
# scale moves every position instead (tests/test_quantize_fp8.py's nanoGPT, one linear's scales 10% too large: each
# run's positions but the largest at 0.60-0.79x of the bound on average, one of them at 1.11x). So there, in each run of a
# prompt, the position furthest from its bound may be FLIP_ALLOWANCE times it, and the others' mean at most
# WIDE_MEAN_ALLOWANCE times it.
FLIP_ALLOWANCE = 2.0
WIDE_MEAN_ALLOWANCE = 0.5
PROMPT_LENGTHS = (6, 4)
PREFILL_TOKENS = 2


# Passes that change how a module computes its positions, which logits it computes or where its KV cache is.
DROP_IN_REWRITES = ("runtime_positions", "select_logits_rows", "module_kv_cache", "match_explicit_attention")


def self_check_wanted(
    verify: bool | None, model, pass_results, from_graph_cache: bool, from_stored_code: bool = False
) -> bool:
    """CompileConfig.verify, or where it is None: a module outside Hugging Face; a graph one of the drop-in passes
    rewrote (they run on HF graphs too: whatever they rewrite is checked, whoever wrote the module); a graph from
    the graph cache (its key may miss something this model does differently); compiled code loaded from a stored
    artifact (compiled_artifact.py: it runs without guards, its key may miss something too)."""
    from transformers import PreTrainedModel

    if verify is not None:
        return verify
    rewrote = any(r.name in DROP_IN_REWRITES and r.sites for r in pass_results)
    return rewrote or from_graph_cache or from_stored_code or not isinstance(model, PreTrainedModel)


class SelfCheckError(RuntimeError):
    """The compiled module does not compute what the module computes; the message says where."""


@torch.no_grad()
def reference_logits(model, signature, prompt: list[int], device) -> torch.Tensor:
    """[len(prompt), V]: the module's logits at each position, from its forward on that prefix."""
    from compiled_llm.capture.forward_signature import output_logits

    rows = []
    for end in range(len(prompt), 0, -1):  # the full prompt first: one call when it returns every position
        ids = torch.tensor(prompt[:end], device=device)
        logits = output_logits(signature.call(model, ids, torch.arange(end, device=device)), model)[0]
        if logits.shape[0] == end:
            return torch.cat([logits] + rows[::-1])
        rows.append(logits[-1:])
    return torch.cat(rows[::-1])


def _run(runner, prompts: list[list[int]], first_step: int) -> list[torch.Tensor]:
    """Each prompt's logits at every position: a step of the first `first_step` tokens of each (all logits),
    then one token of each per step."""
    seqs = [Sequence(list(p)) for p in prompts]
    out = [[] for _ in prompts]
    try:
        chunks = [ScheduledChunk(s, min(first_step, len(s)), "all") for s in seqs]
        logits = runner.execute(chunks)
        offset = 0
        for i, chunk in enumerate(chunks):
            out[i].append(logits[offset : offset + chunk.num_tokens].float().cpu())
            offset += chunk.num_tokens
        while any(s.num_pending for s in seqs):
            pending = [i for i, s in enumerate(seqs) if s.num_pending]
            logits = runner.execute([ScheduledChunk(seqs[i], 1, "last") for i in pending])
            for row, i in enumerate(pending):
                out[i].append(logits[row : row + 1].float().cpu())
    finally:
        for seq in seqs:
            runner.release(seq)
    return [torch.cat(rows) for rows in out]


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """[L]: each position's RMS difference over the RMS of its expected logits."""
    return (actual - expected).pow(2).mean(-1).sqrt() / expected.pow(2).mean(-1).sqrt().clamp(min=1e-12)


def _differences(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, rms_bound: float | None = None,
                 one_flip: bool = False) -> tuple[str, int, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(what is compared, how many allowances apart the best two logits must be for the greedy token to count, [L]
    allowed, [L] difference) of [L, V] logits: the largest difference against `tolerance` times the largest |logit|
    (at least 1), or with `rms_bound` (FP8 activations) each position's RMS difference against `rms_bound` times its
    RMS logit, the position furthest from it allowed FLIP_ALLOWANCE times that where `one_flip` (wide activations)."""
    if rms_bound is None:
        allowed = torch.full((len(expected),), tolerance * max(1.0, expected.abs().max().item()))
        return "max |difference|", 2, allowed, (actual - expected).abs().amax(dim=-1)
    # a flip of a decisive token needs two logits each several RMS differences off
    allowed = rms_bound * expected.pow(2).mean(-1).sqrt()
    diff = (actual - expected).pow(2).mean(-1).sqrt()
    if one_flip:
        allowed[(diff / allowed.clamp(min=1e-30)).argmax()] *= FLIP_ALLOWANCE
    return "RMS difference", 3, allowed, diff


def _others_mean(diff: torch.Tensor, allowed: torch.Tensor) -> float:
    """The mean share of their bound of every position but the one furthest from it (0 for one position): how far a
    run is off where no single rounding flip explains it."""
    shares = (diff / allowed.clamp(min=1e-30)).sort().values
    return shares[:-1].mean().item() if len(shares) > 1 else 0.0


def share_of_bound(actual: torch.Tensor, expected: torch.Tensor, tolerance: float,
                   rms_bound: float | None = None, one_flip: bool = False) -> float:  # fmt: skip
    """The largest difference of [L, V] logits as a share of what the check allows there (above 1 fails it); with
    `one_flip`, the others' mean as a share of WIDE_MEAN_ALLOWANCE if that is larger."""
    _, _, allowed, diff = _differences(actual, expected, tolerance, rms_bound, one_flip)
    share = (diff / allowed.clamp(min=1e-30)).max().item()
    return max(share, _others_mean(diff, allowed) / WIDE_MEAN_ALLOWANCE) if one_flip else share


def _mismatch(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, rms_bound: float | None = None,
              one_flip: bool = False) -> str | None:  # fmt: skip
    """What differs between [L, V] logits, or None: the difference against what _differences allows, the greedy
    token wherever the best two logits are further apart than that allows, and with `one_flip` the mean of the
    positions but the furthest (_others_mean) against WIDE_MEAN_ALLOWANCE."""
    what, margin, allowed, diff = _differences(actual, expected, tolerance, rms_bound, one_flip)
    top2 = expected.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > margin * allowed
    wrong_token = decisive & (actual.argmax(-1) != expected.argmax(-1))
    bad = (diff > allowed) | wrong_token
    if not bad.any():
        mean = _others_mean(diff, allowed) if one_flip else 0.0
        if mean > WIDE_MEAN_ALLOWANCE:  # no single position is off by more than a flip, yet most are off
            return (f"every position but the furthest: mean {what} {mean:.3g} of its bound (allowed "
                    f"{WIDE_MEAN_ALLOWANCE:.3g})")  # fmt: skip
        return None
    first = int(bad.nonzero()[0])
    return (f"position {first}: {what} {diff[first].item():.3g} (allowed {allowed[first].item():.3g}), greedy token "
            f"{int(actual[first].argmax())} vs {int(expected[first].argmax())}")  # fmt: skip


def position_suspects(gm) -> list[str]:
    """Ops of the captured graph whose result depends on the number of tokens in a step and that no pass
    rewrote: where a computation over positions usually hides (a mask, a cumulative sum, an arange)."""
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(
            k in str(node.target) for k in ("arange", "tril", "triu", "cumsum", "ones", "full", "zeros")
        ):
            continue
        line = user_line(node)
        names.append(f"{node.target} ({line})" if line else str(node.target))
    return names


def _first_difference(compiled, captured, prompt, first_step, tolerance: float) -> str | None:
    """The first op that differs (first_difference.py), in the step shape that failed, else in incremental
    decode; None if not found or if looking fails (the mismatch is reported either way)."""
    if captured is None:
        return None
    from compiled_llm.first_difference import first_difference

    for step in dict.fromkeys((first_step, PREFILL_TOKENS)):
        try:
            where = first_difference(compiled, captured, prompt, step, tolerance)
        except Exception:  # a diagnosis only: never in the way of the error it explains
            log.debug("looking for the first op that differs failed", exc_info=True)
            return None
        if where:
            return where
    return None


def self_check(compiled, model, signature, captured=None, graph_cache_key: str | None = None) -> float:
    """Raise SelfCheckError if the compiled model's logits differ from the module's (see module docstring); else
    return the largest difference as a share of what the check allows (share_of_bound over every comparison), which
    says how close a graph came. `captured`: the graph as captured, before the passes, to find the first op where
    they part. `graph_cache_key`: the graph cache entry the graph came from, removed if the check fails (the next
    compile captures afresh)."""
    dtype = compute_dtype(model)
    generator = torch.Generator().manual_seed(0)
    lengths = [min(n, compiled.max_seq_len) for n in PROMPT_LENGTHS]
    prompts = [torch.randint(0, compiled.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    # With quantization, the module's linears round as the rewrite means them to: the rest is checked exactly.
    meta = compiled.graph_module.meta
    weight_only = {"int4_weights": int4_module, "int8_weights": int8_module, "nvfp4_weights": nvfp4_module,
                   "int8_block_weights": int8_block_module}  # fmt: skip
    roundings = [module_for(model, meta[key]) for key, module_for in weight_only.items() if meta.get(key)]
    if not roundings:
        roundings = [quantized_module(model, meta.get("fp8_weights", []), meta.get("fp8_format", "fp8"),
                                      meta.get("fp8_column_parts", []), meta.get("fp8_input_scales", []))]  # fmt: skip
    with contextlib.ExitStack() as stack:  # a GGUF file's 4-bit and 8-bit blocks: both
        for rounding in roundings:
            stack.enter_context(rounding)
        expected = [reference_logits(model, signature, p, compiled.device).float().cpu() for p in prompts]
    tolerance, rms_bound = TOLERANCE.get(dtype, 1e-2), None
    # FP8 and int8_sq round activations too, and a rounding that flips between two near values moves the logits more
    # than float summation order would; int4's reference rounds only the weights, the pass's own, so it is held as
    # tightly as an unquantized graph.
    one_flip = False
    if meta.get("fp8_weights") or meta.get("int8_weights"):
        unquantized = [reference_logits(model, signature, p, compiled.device).float().cpu() for p in prompts]
        moved = max(relative_rms(e, u).max().item() for e, u in zip(expected, unquantized))
        rms_bound = max(QUANTIZED_FLOOR_FACTOR * tolerance, QUANTIZED_ALLOWANCE * moved)
        one_flip = dtype.itemsize >= 4  # float32 or wider: FLIP_ALLOWANCE
        flip = f" ({FLIP_ALLOWANCE:g}x at one position a run)" if one_flip else ""
        log.info("self-check: quantizing activations moves this module's logits by up to %.3g (relative RMS); allowed "
                 "%.3g%s", moved, rms_bound, flip)  # fmt: skip
        tolerance = rms_bound  # for the diagnosis of the first op that differs
    runner = compiled.runner
    together = compiled.config.max_batch_size >= len(prompts) and runner.kv_cache.allocator.num_free >= sum(
        runner.kv_cache.blocks_for(n) for n in lengths
    )
    groups = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    runs = {
        "both prompts in one step (a flat batch of two sequences)": max(lengths),
        f"prefill of {PREFILL_TOKENS} tokens, then one token per step (incremental decode)": PREFILL_TOKENS,
    }
    closest = (0.0, "")
    for what, first_step in runs.items():
        actuals = {}
        for group in groups:
            actuals.update(zip(group, _run(runner, [prompts[i] for i in group], first_step)))
        for i, reference in enumerate(expected):
            actual = actuals[i]
            problem = _mismatch(actual, reference, tolerance, rms_bound, one_flip)
            if problem:
                where = _first_difference(compiled, captured, prompts[i], first_step, tolerance)
                _fail(compiled, model, f"{what}, prompt {i}, {problem}", where, graph_cache_key)
            share = share_of_bound(actual, reference, tolerance, rms_bound, one_flip)
            closest = max(closest, (share, f"{what}, prompt {i}"), key=lambda c: c[0])
    log.info("self-check passed: the largest difference is %.1f%% of what it allows (%s)", 100 * closest[0],
             closest[1])  # fmt: skip
    return closest[0]


def _fail(compiled, model, problem: str, where: str | None, graph_cache_key: str | None) -> NoReturn:
    """Raise the SelfCheckError for `problem`, after removing whatever would serve the same graph again."""
    suspects = position_suspects(compiled.graph_module)
    hint = f"; first op that differs: {where}" if where else ""
    hint += f"; ops over the step's tokens left in the graph: {'; '.join(suspects)}" if suspects else ""
    message = (
        f"the compiled {type(model).__name__} differs from the module itself ({problem}): compiled-llm does not know "
        f"how to run this module over a paged KV cache{hint}. compile_model(..., verify=False) skips this check at "
        "your own risk"
    )
    artifact = getattr(compiled.runner.graph, "artifact_path", None)
    if artifact is not None:  # else the next compile loads the same stored code and fails again
        from compiled_llm.compiled_artifact import remove as remove_artifact

        remove_artifact(artifact)
    if graph_cache_key is not None:
        from compiled_llm.capture.graph_cache import remove

        remove(compiled.config.cache_dir, graph_cache_key)
        message += (f". The graph came from the graph cache (entry {graph_cache_key}, now removed): compile again to "
                    "capture this model afresh, or pass graph_cache=False")  # fmt: skip
    raise SelfCheckError(message)
