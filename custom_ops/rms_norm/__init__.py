"""RMSNorm: `compiled_llm::rms_norm` and `compiled_llm::add_rms_norm`, their torch reference and Triton kernel
(op.py); `compiled_llm::add_rms_norm_fp8` and `add_rms_norm_int8`, the same kernel writing FP8 or int8 linears'
activations (fp8.py, int8.py); `compiled_llm::qk_rms_norm`, an attention layer's per-head query and key norms in one
launch (qk.py). Importing the package registers the ops."""

from custom_ops.rms_norm import fp8, int8, op, qk  # noqa: F401  (registers the ops)
