"""Named graph passes and the pipeline that runs them.

A pass is a function `(gm, config) -> PassResult`, registered under a name with `@register_pass`. The
pipeline is data: a list of names (`CompileConfig.passes`, or `DEFAULT_PIPELINE`). Only this module
decides the default order; each ordering constraint is commented where the order is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx

if TYPE_CHECKING:
    from compiled_llm.config import CompileConfig

log = logging.getLogger("compiled_llm.passes")

PassFn = Callable[[torch.fx.GraphModule, "CompileConfig"], "PassResult"]


@dataclass
class PassResult:
    """What one pass did: `sites` counts the places it rewrote (0 is not an error)."""

    name: str
    sites: int
    detail: str = ""
    seconds: float = field(default=0.0, compare=False)


_PASSES: dict[str, PassFn] = {}

DEFAULT_PIPELINE: tuple[str, ...] = (
    # First: export leaves asserts and no-op casts that would hide patterns from the matchers below.
    "graph_cleanup",
    # Any time before compiling: Dynamo cannot infer a -1 over the unbacked token count.
    "explicit_view_sizes",
    # Any time before compiling, likewise: Inductor cannot decide a strided constant's contiguity over the tokens.
    "contiguous_constants",
    # Non-HF modules: positions from the runtime, logits of every row asked for (no-ops for HF models).
    "runtime_positions",
    "select_logits_rows",
    # After runtime_positions, which indexes a complex RoPE table by the positions (then read as real pairs);
    # before the matchers and fusions, which see only real ops.
    "complex_as_real_pairs",
    # Before match_sdpa_attention, which pages the causal SDPA calls it leaves.
    "module_kv_cache",
    # Before insert_paged_attention: plain SDPA calls must become canonical attention ops to be paged.
    "match_sdpa_attention",
    # After runtime_positions, whose position tables bound the masks it proves causal.
    "match_explicit_attention",
    # After explicit_view_sizes, whose constant head counts it rewrites to the rank's, and after the attention
    # matchers (it shards by the canonical attention op's heads); before fuse_parallel_linears (which would fuse
    # q/k/v and gate/up into one weight it would have to cut per part) and quantize_fp8 (which quantizes the shards).
    "shard_tensor_parallel",
    # After shard_tensor_parallel (which refuses a linear the plan leaves whole reading a split value, so the LM
    # head's input is whole); before quantize_fp8 (which finds the LM head as the last linear, and quantizes shards).
    "shard_vocabulary",
    # After shard_tensor_parallel (which refuses an experts op reading a split value); before quantize_fp8 (which
    # quantizes the rank's experts only) and fuse_moe_routing (which keeps the id shift it inserts).
    "shard_experts",
    # After cleanup, which removes the no-op casts between a shared input and its linears.
    "fuse_parallel_linears",
    # After fusion, whose in-place views it rebuilds RoPE on; before paging, which it leaves alone.
    "token_major_attention_inputs",
    # After cleanup, which removes the no-op casts of float32 models that the matcher allows for.
    "fuse_rms_norm",
    # After fuse_rms_norm, whose rms_norm ops it pairs (keeping their backend); before insert_paged_attention, since
    # it pairs them by the canonical attention op they feed as q and k.
    "fuse_qk_norm",
    # After fusion (q/k/v and gate/up quantized fused) and the RoPE rebuild over fused outputs; before
    # insert_linear_op, which then routes only the linears left in the model's dtype (the LM head).
    "quantize_fp8",
    # Under quantization="int4_awq", "int4_gptq" or "gguf" only, where quantize_fp8 is (its calibration runs the graph as rewritten so far).
    "quantize_int4",
    # Under quantization="int8_sq" only, likewise.
    "quantize_int8",
    # After quantize_int8, on the int8 linears it inserts; exact (the norm and the gate round as the linear would).
    "fuse_norm_quantize_int8",
    "fuse_silu_mul_quantize_int8",
    # Under quantization="nvfp4" only, likewise.
    "quantize_nvfp4",
    # Under quantization="gguf" only: the 5/6/8-bit blocks beside quantize_int4's 4-bit ones.
    "keep_gguf_int8_blocks",
    # Under quantization="mxfp4" only; before insert_fused_moe, which picks the experts' kernel.
    "keep_mxfp4_experts",
    # After the quantizing passes (a router's linear over a widened weight must stay unquantized); before
    # insert_linear_op, which routes the linears over parameters only.
    "fold_weight_casts",
    # After every pass that matches aten.linear (fusion, the RoPE rebuild over fused outputs).
    "insert_linear_op",
    # On the linears insert_linear_op routed.
    "fuse_linear_silu_mul",
    # After quantize_fp8 (whose experts op it feeds too); before insert_fused_moe, which picks the experts' kernel.
    "fuse_moe_routing",
    # Any time: it only picks the kernel of the experts ops the capture inserted.
    "insert_fused_moe",
    # After fuse_rms_norm and the quantizing norm fusions (which take an add_rms_norm first) and after the sharding
    # passes' all-reduces: a row-parallel sum with the add and norm that read it.
    "fuse_all_reduce_rms_norm",
    # Last rewrite: later passes see the paged op and the KV cache inputs it adds.
    "insert_paged_attention",
)

# Exact, and their kernels pass on an H200; opt-in (CompileConfig.passes, right after quantize_fp8) until measured end
# to end on a GPU. (Their first GPU compile hung in torch 2.11's Inductor: compile.register_custom_op_fallbacks.)
FP8_PRODUCER_FUSIONS: tuple[str, ...] = ("fuse_norm_quantize_fp8", "fuse_silu_mul_quantize_fp8")


def with_fp8_fusions(pipeline: tuple[str, ...], fusions: tuple[str, ...] = FP8_PRODUCER_FUSIONS) -> tuple[str, ...]:
    """`pipeline` with `fusions` (of FP8_PRODUCER_FUSIONS) right after quantize_fp8, where they must run."""
    after = pipeline.index("quantize_fp8") + 1
    return (*pipeline[:after], *fusions, *pipeline[after:])


# The runtime cannot run a graph without these.
REQUIRED_PASSES: tuple[str, ...] = ("insert_paged_attention",)


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def register(fn: PassFn) -> PassFn:
        if name in _PASSES and _PASSES[name] is not fn:
            raise ValueError(f"a pass named {name!r} is already registered")
        _PASSES[name] = fn
        return fn

    return register


def registered_passes() -> dict[str, PassFn]:
    return dict(_PASSES)


def run_passes(gm: torch.fx.GraphModule, config: CompileConfig) -> list[PassResult]:
    """Run the configured pipeline over `gm` in place; returns one result per pass, in order."""
    names = config.passes if config.passes is not None else DEFAULT_PIPELINE
    results = []
    for name in names:
        start = time.perf_counter()
        result = _PASSES[name](gm, config)
        result.seconds = time.perf_counter() - start
        gm.graph.lint()
        log.info("pass %-24s %4d sites  %s", name, result.sites, result.detail)
        results.append(result)
    gm.recompile()
    return results
