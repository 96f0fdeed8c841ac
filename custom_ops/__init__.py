"""torch.library ops of compiled-llm: each with a fake implementation, a reference implementation that
runs on CPU, and GPU backends registered by name. One folder per op family: all_reduce/, attention/, linear/,
moe/, rms_norm/, argmax/; triton_runtime.py holds what every Triton kernel launch shares. Importing the
package registers the ops."""

from custom_ops import all_reduce, attention, linear, moe, rms_norm  # noqa: F401  (registers ops, backends)
from custom_ops.attention import (
    AttentionBackend,
    AttentionPlanner,
    LayerAttentionFeatures,
    StepAttentionMetadata,
    attend_one_sequence,
    get_attention_backend,
    planned_step,
    planners_for,
    register_attention_backend,
    select_attention_backend,
    write_kv_cache,
)

__all__ = [
    "AttentionBackend",
    "AttentionPlanner",
    "LayerAttentionFeatures",
    "StepAttentionMetadata",
    "planned_step",
    "planners_for",
    "attend_one_sequence",
    "get_attention_backend",
    "register_attention_backend",
    "select_attention_backend",
    "write_kv_cache",
]
