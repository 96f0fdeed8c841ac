"""torch.library ops of compiled-llm: each with a fake implementation, a reference implementation that
runs on CPU, and GPU backends registered by name. Importing the package registers the ops."""

from custom_ops import attention, paged_attention  # noqa: F401  (registers the ops)
from custom_ops.attention_backends import (
    AttentionBackend,
    LayerAttentionFeatures,
    get_attention_backend,
    register_attention_backend,
    select_attention_backend,
)
from custom_ops.attention_math import attend_one_sequence
from custom_ops.paged_attention import write_kv_cache

__all__ = [
    "AttentionBackend",
    "LayerAttentionFeatures",
    "attend_one_sequence",
    "get_attention_backend",
    "register_attention_backend",
    "select_attention_backend",
    "write_kv_cache",
]
