"""Linear layers: `compiled_llm::linear` and `compiled_llm::linear_silu_mul` with their backends by name
(op.py: `torch`, `triton`, `onednn`); the Triton kernels the `triton` backend runs (triton_gemv.py,
triton_silu_mul.py). Quantized linears (FP8, INT4, ...) belong here, as further backends of these ops.
Importing the package registers the ops."""

from custom_ops.linear.op import FUSED_SILU_MUL_BACKENDS, onednn_is_faster, onednn_unavailable, runs_other_than_torch

__all__ = ["FUSED_SILU_MUL_BACKENDS", "onednn_is_faster", "onednn_unavailable", "runs_other_than_torch"]
