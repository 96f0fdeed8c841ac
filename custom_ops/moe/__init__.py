"""Mixture-of-experts layers: `compiled_llm::moe_experts` (op.py: the op, its reference and backends by name), the
Triton grouped GEMMs of its `triton` backend (triton_moe.py) and their candidates for the autotuner (tuning.py);
fp8.py: `compiled_llm::moe_experts_fp8`, the experts' weights in float8 e4m3; mxfp4.py: `compiled_llm::moe_experts_mxfp4`,
in MXFP4 (GPT-OSS's checkpoints); routing.py: `compiled_llm::moe_route`, a
router's softmax, top-k and renormalisation in one kernel. Importing the package registers the ops and the tuning."""

from custom_ops.moe import fp8, mxfp4, routing, tuning  # noqa: F401  (registers moe_experts_fp8, _mxfp4, moe_route, the tuning)
from custom_ops.moe.op import MOE_BACKENDS, experts_ops, moe_experts_reference

EXPERTS_OPS = experts_ops()

__all__ = ["EXPERTS_OPS", "MOE_BACKENDS", "moe_experts_reference"]
