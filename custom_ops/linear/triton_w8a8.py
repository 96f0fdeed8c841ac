"""Triton kernels of 8-bit weights and activations (W8A8): `compiled_llm::fp8_linear`'s `triton` backend, in its
numerics (fp8.py), and `compiled_llm::int8_linear`'s (int8.py; SmoothQuant's smooth, int8 codes, int32 sums):

- `quantize_rows`: x [M, K] (times a smooth) -> (e4m3 or int8 x8 [M, K], float32 s_x [M, 1]) in one kernel, one
  program per row (amax, scale, rounding; eager torch takes six kernels or more), before the GEMM;
- the decode GEMM (triton_decode_gemm.py, shared with 16-bit linears) for decode rows (1 to 64): with the
  quantizing kernel before it, a layer's linears take ~70 us against ~91 for the CUDA-core GEMV it replaced (even on
  the small ones, 1.3-1.7x on gate/up and down; BENCHMARKS.md); more rows go to `torch._scaled_mm` (FP8) or to
  `torch._int_mm` and `scale_sums` (int8).

Scales and roundings are computed as fp8.scale_and_round and int8.round_to_int8 define them (products and one IEEE
reciprocal, `div_rn`; int8 rounds half to even, as torch.round), so each 8-bit value equals the reference's. Products
of two e4m3 values are exact in float32 and summed in float32, which leaves the summation order as the only
difference; int8 products are summed exactly in int32 (|x8 W8| <= 127^2, K < 2^17) and rounded once to float32.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.linear.triton_decode_gemm import NO_FMA  # scale_sums' epilogue rounds as the decode GEMM's
from custom_ops.triton_runtime import pdl_launch_options


@functools.cache
def _kernels():
    from custom_ops.linear import triton_w8a8_kernels

    return triton_w8a8_kernels.quantize_rows_kernel, triton_w8a8_kernels.scale_sums_kernel


def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None, smooth: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """fp8.quantize_rows (`dtype` e4m3) or int8.quantize_rows (int8, with a contiguous float32 `smooth` [K] or
    None) in one kernel: x [M, K] with unit last stride -> (x8 [M, K], s_x [M, 1])."""
    import triton

    m, k = x.shape
    quantized = torch.empty(m, k, device=x.device, dtype=dtype)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _kernels()[0][(m,)](
        x, input_scale if input_scale is not None else scale, smooth if smooth is not None else scale, quantized,
        scale, x.stride(0), quantized.stride(0), K=k, BLOCK=block, STATIC=input_scale is not None,
        HAS_SMOOTH=smooth is not None, INT8=dtype == torch.int8, num_warps=min(16, max(4, block // 1024)),
        **pdl_launch_options(x),
    )  # fmt: skip
    return quantized, scale


def scale_sums(sums: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """int8 sums [M, N] (torch._int_mm's, unit last stride) * x_scale [M, 1] * weight_scale [N] (+ bias [N]), both
    scales contiguous float32, in `out_dtype`, in one kernel: int8.py's epilogue in the reference's order."""
    import triton

    m, n = sums.shape
    out = sums.new_empty(m, n, dtype=out_dtype)
    block_m, block_n = 32, 128
    _kernels()[1][(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        sums, x_scale, weight_scale, bias if bias is not None else weight_scale, out, m, n, sums.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **NO_FMA,
        **pdl_launch_options(sums),
    )  # fmt: skip
    return out
