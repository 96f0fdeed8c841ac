"""Mixture-of-experts layers: `compiled_llm::moe_experts` (op.py: the op, its reference and backends by name), the
Triton grouped GEMMs of its `triton` backend (triton_moe.py). Importing the package registers the op."""

from custom_ops.moe.op import MOE_BACKENDS, moe_backend, moe_experts_reference

__all__ = ["MOE_BACKENDS", "moe_backend", "moe_experts_reference"]
