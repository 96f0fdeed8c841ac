"""Linear layers: `compiled_llm::linear` and `compiled_llm::linear_silu_mul` with their backends by name
(op.py: `torch`, `triton`, `onednn`); the Triton kernels the `triton` backend runs (triton_gemv.py,
triton_silu_mul.py, and triton_decode_gemm.py: the tensor-core decode GEMM of 2 to 64 rows where tuned, which the
8-bit formats' decode rows run too); quantized linears, an op per weight format with its reference and backends:
- fp8.py: `compiled_llm::fp8_linear`, launched by triton_w8a8.py (kernels in triton_w8a8_kernels.py); fp8_block.py:
  `compiled_llm::fp8_block_linear`, triton_fp8_block.py; silu_mul_fp8.py: `compiled_llm::silu_mul_fp8`, a gated
  activation written as an FP8 linear's input;
- int4.py: `compiled_llm::int4_linear`, 4-bit weights with group scales and zero points (W4A16: AWQ, GPTQ, GGUF),
  launched by triton_int4.py; nvfp4.py: `compiled_llm::nvfp4_linear`, E2M1 weights with e4m3 scales per 16 columns,
  launched by triton_nvfp4.py; both kernels' code in triton_int4_kernels.py;
- int8.py: `compiled_llm::int8_linear`, SmoothQuant W8A8, on the W8A8 kernels as FP8; silu_mul_int8.py:
  `compiled_llm::silu_mul_int8`, the gated activation written as its input; int8_weight.py:
  `compiled_llm::int8_weight_linear`, 8-bit codes with group scales and offsets (W8A16: GGUF's Q5_K, Q6_K and Q8_0),
  on the 4-bit GEMM kernel.
The `*_tuning.py` modules make the kernels' launches autotuner candidates. Importing the package registers the ops
and their tunings."""

# Register the ops and their tunings.
from custom_ops.linear import (  # noqa: F401
    decode_gemm_tuning,
    fp8,
    fp8_block,
    fp8_block_tuning,
    gemv_tuning,
    int4,
    int4_tuning,
    int8,
    int8_weight,
    nvfp4,
    nvfp4_tuning,
    silu_mul_fp8,
    silu_mul_int8,
)
from custom_ops.linear.op import FUSED_SILU_MUL_BACKENDS, onednn_is_faster, onednn_unavailable, runs_other_than_torch

__all__ = ["FUSED_SILU_MUL_BACKENDS", "onednn_is_faster", "onednn_unavailable", "runs_other_than_torch"]
