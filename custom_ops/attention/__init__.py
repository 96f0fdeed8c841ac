"""Attention. `compiled_llm::attention` (op.py): the canonical op capture routes every layer through.
`compiled_llm::paged_attention` (paged.py): what passes turn it into, a mixed batch over the paged KV cache
run by a backend chosen per layer. reference.py: the dense math both are checked against. backends.py: the
backend registry, the per-layer choice, the per-step plan scope. Backends: `reference` (paged.py), `sdpa`
(sdpa.py), `triton` (triton.py, kernels in triton_kernel.py), `flashinfer` (flashinfer.py), `xqa` (xqa.py: FlashInfer's
XQA kernel for decode steps, triton's for the rest); the Triton
KV-cache write of the GPU ones: kv_cache_write.py. phased.py: a backend per step phase and decode batch size
(`decode<=8:triton,decode:flashinfer,prefill:flashinfer`), what the autotuner chooses (tuning.py). Importing the package registers the ops and backends."""

from custom_ops.attention import flashinfer, op, paged, sdpa, triton, tuning, xqa  # noqa: F401  (registers the ops, backends, tuning)
from custom_ops.attention.backends import (
    AttentionBackend,
    AttentionPlanner,
    LayerAttentionFeatures,
    StepAttentionMetadata,
    get_attention_backend,
    planned_step,
    register_attention_backend,
    select_attention_backend,
)
from custom_ops.attention.paged import write_kv_cache
from custom_ops.attention.phased import planners_for
from custom_ops.attention.reference import attend_one_sequence

__all__ = [
    "AttentionBackend",
    "AttentionPlanner",
    "LayerAttentionFeatures",
    "StepAttentionMetadata",
    "attend_one_sequence",
    "get_attention_backend",
    "planned_step",
    "planners_for",
    "register_attention_backend",
    "select_attention_backend",
    "write_kv_cache",
]
