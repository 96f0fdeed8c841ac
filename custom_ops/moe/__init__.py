"""Mixture-of-experts layers: `compiled_llm::moe_experts` (op.py: the op, its reference and backends by name), the
Triton grouped GEMMs of its `triton` backend (triton_moe.py) and their candidates for the autotuner (tuning.py);
fp8.py: `compiled_llm::moe_experts_fp8`, the experts' weights in float8 e4m3.
Importing the package registers the op and its tuning."""

from custom_ops.moe import fp8, tuning  # noqa: F401  (registers moe_experts_fp8, the grouped GEMMs' tuning)
from custom_ops.moe.op import MOE_BACKENDS, moe_backend, moe_experts_reference

__all__ = ["MOE_BACKENDS", "moe_backend", "moe_experts_reference"]
