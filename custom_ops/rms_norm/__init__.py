"""RMSNorm: `compiled_llm::rms_norm` and `compiled_llm::add_rms_norm`, their torch reference and Triton kernel
(op.py). Importing the package registers the ops."""

from custom_ops.rms_norm import op  # noqa: F401  (registers the ops)
