"""Graph passes of compiled-llm: one pass per module, registered by name (see `registry.py`)."""

from fx_passes import (  # noqa: F401  (registers the passes)
    contiguous_constants,
    explicit_view_sizes,
    fuse_linear_silu_mul,
    fuse_moe_routing,
    fuse_norm_quantize_fp8,
    fuse_parallel_linears,
    fuse_qk_norm,
    fuse_rms_norm,
    fuse_silu_mul_quantize_fp8,
    graph_cleanup,
    insert_fused_moe,
    insert_linear_op,
    insert_paged_attention,
    keep_mxfp4_experts,
    match_explicit_attention,
    match_sdpa_attention,
    module_kv_cache,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    runtime_positions,
    select_logits_rows,
    shard_experts,
    shard_tensor_parallel,
    shard_vocabulary,
    token_major_attention_inputs,
)
from fx_passes.insert_paged_attention import PAGED_INPUTS, PagedLayer
from fx_passes.registry import (
    DEFAULT_PIPELINE,
    FP8_PRODUCER_FUSIONS,
    REQUIRED_PASSES,
    PassResult,
    register_pass,
    registered_passes,
    run_passes,
    with_fp8_fusions,
)

__all__ = [
    "DEFAULT_PIPELINE",
    "FP8_PRODUCER_FUSIONS",
    "PAGED_INPUTS",
    "REQUIRED_PASSES",
    "PagedLayer",
    "PassResult",
    "register_pass",
    "registered_passes",
    "run_passes",
    "with_fp8_fusions",
]
