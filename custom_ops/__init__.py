"""torch.library ops of compiled-llm: each with a fake implementation, a reference implementation that
runs on CPU, and GPU backends registered by name. Importing the package registers the ops."""

from custom_ops import attention, flashinfer_attention, linear, paged_attention, rms_norm, sdpa_attention, triton_attention  # noqa: F401  (registers ops, backends)
from custom_ops.attention_backends import (
    AttentionBackend,
    AttentionPlanner,
    LayerAttentionFeatures,
    StepAttentionMetadata,
    get_attention_backend,
    planned_step,
    register_attention_backend,
    select_attention_backend,
)
from custom_ops.attention_math import attend_one_sequence
from custom_ops.paged_attention import write_kv_cache

__all__ = [
    "AttentionBackend",
    "AttentionPlanner",
    "LayerAttentionFeatures",
    "StepAttentionMetadata",
    "planned_step",
    "attend_one_sequence",
    "get_attention_backend",
    "register_attention_backend",
    "select_attention_backend",
    "write_kv_cache",
]
