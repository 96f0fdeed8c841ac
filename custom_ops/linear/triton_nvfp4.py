"""Launches of `compiled_llm::nvfp4_linear`'s `triton` backend (numerics: nvfp4.py), kernels in
triton_int4_kernels.py:

- `nvfp4_gemv`: one row, on CUDA cores: int4_gemv_kernel with E2M1=True. Codes stream as 32-bit words, two decoded
  at once into float16 e2m1 * 2^-14 (a shift, two masks and an or: no table), their products with x summed in
  float32 per 16 columns and multiplied by the block's e4m3 scale (decoded the same way), the global scale applied
  to the channel's sum. It reads 4.5 bits a weight (the codes and a byte of scale per 16).
- `nvfp4_gemm`: more rows, on tensor cores (nvfp4_gemm_kernel): codes and scales decoded to e2m1 * s, exact in
  the activations' dtype.

Up to 16 rows of bfloat16 or float16 go to gluon_int4.py's tensor-core decode instead (E2M1: the codes decoded to
e2m1 * s in the MMA's operand layout), unless the tuner chose a launch of these kernels. Autotuned launches
(nvfp4_tuning.py) override the defaults below per weight shape on a device.
"""

from __future__ import annotations

import torch

from custom_ops.linear.nvfp4 import BLOCK
from custom_ops.linear.triton_int4 import (
    divides_parts,
    four_bit_kernels,
    part_ends,
    power_of_2_at_most,
    tensor_core_decode,
    triton_cdiv,
    triton_launch,
)
from custom_ops.triton_runtime import pdl_launch_options

# The autotuner's choices in this process, by (device index as Tensor.get_device gives it, N, K) for the GEMV and
# (..., rows bucket) for the GEMM: launch overrides of gemv_config's / gemm_config's.
TUNED_GEMV: dict[tuple[int, int, int], dict] = {}
TUNED_GEMM: dict[tuple[int, int, int, int], dict] = {}
GEMM_ROW_BUCKETS = (16, 64)  # decode batches; more rows run gemm_config's prefill tile


def gemv_config(n: int, k: int) -> dict:
    """The GEMV's launch for weight [n, k]: 8 channels a program and 1024 columns (512 bytes a row, 64 scales) a
    step, over 8 warps, or 4 on a wide linear (gate/up), whose programs are many: the leaders of an H200 sweep over
    Llama-8B's shapes (BENCHMARKS.md)."""
    return {"BLOCK_N": 8, "GROUPS_A_STEP": power_of_2_at_most(min(64, k // BLOCK)), "num_warps": 4 if n >= 16384 else 8}


def nvfp4_gemv(rows, weight, scales, global_scale, smooth, smooth_rows, bias, **tile) -> torch.Tensor:
    """y [1, N] for rows [1, K] (nvfp4.triton_takes checked what the kernel reads)."""
    n, k = weight.shape[0], 2 * weight.shape[1]
    tuned = TUNED_GEMV.get((rows.get_device(), n, k), {})
    out = tensor_core_decode(tile, tuned, rows, weight, scales, global_scale, smooth, smooth_rows, bias, None)
    if out is not None:
        return out
    launch = {**gemv_config(n, k), **triton_launch(tuned), **triton_launch(tile)}
    if smooth is not None:
        launch["BLOCK_N"] = divides_parts(launch["BLOCK_N"], smooth_rows)
    out = rows.new_empty(1, n)
    four_bit_kernels().int4_gemv_kernel[(triton_cdiv(n, launch["BLOCK_N"]),)](
        rows, weight, scales.view(torch.uint8), global_scale, smooth if smooth is not None else rows,
        bias if bias is not None else rows, out, n, weight.stride(0), scales.stride(0), *part_ends(n, smooth_rows),
        K=k, GROUP=BLOCK, HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None, E2M1=True, **launch,
        **pdl_launch_options(rows),
    )  # fmt: skip
    return out


def gemm_config(m: int) -> dict:
    """The tensor-core GEMM's tile for [m] rows: the MMA's narrow side (16) for decode batches, larger tiles for
    prefill."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def nvfp4_gemm(rows, weight, scales, global_scale, smooth, smooth_rows, bias, **tile) -> torch.Tensor:
    """y [M, N] for rows [M, K] on tensor cores (nvfp4.triton_takes checked what the kernel reads)."""
    m, n, k = rows.shape[0], weight.shape[0], 2 * weight.shape[1]
    bucket = next((b for b in GEMM_ROW_BUCKETS if m <= b), None)
    tuned = TUNED_GEMM.get((rows.get_device(), n, k, bucket), {}) if bucket else {}
    out = tensor_core_decode(tile, tuned, rows, weight, scales, global_scale, smooth, smooth_rows, bias, None)
    if out is not None:
        return out
    launch = {**gemm_config(m), **triton_launch(tuned), **triton_launch(tile)}
    if k % launch["BLOCK_K"]:
        launch["BLOCK_K"] = 64  # triton_takes: K a multiple of 64
    if smooth is not None:
        launch["BLOCK_N"] = divides_parts(launch["BLOCK_N"], smooth_rows)
    out = rows.new_empty(m, n)
    grid = (triton_cdiv(m, launch["BLOCK_M"]), triton_cdiv(n, launch["BLOCK_N"]))
    four_bit_kernels().nvfp4_gemm_kernel[grid](
        rows, weight, scales.view(torch.uint8), global_scale, smooth if smooth is not None else rows,
        bias if bias is not None else rows, out, m, n, rows.stride(0), weight.stride(0), scales.stride(0),
        out.stride(0), *part_ends(n, smooth_rows), K=k, HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None,
        **launch, **pdl_launch_options(rows),
    )  # fmt: skip
    return out
