"""`compiled_llm::fp8_linear`: y = x @ W^T (+ b) with W stored in float8 e4m3 and x quantized to it too (W8A8).

Numerics, which every backend is held to (tests/test_fp8_linear.py):
- the weight, once, per output channel: s_w[n] = max|W[n, :]| * c_n * (1/448), W8 = e4m3(clamp(W * (1 / s_w),
  +-448)), rounded to nearest (products and a reciprocal rather than quotients: see scale_and_round), c_n in
  (0.84, 1] the clip that rounds channel n with the least squared error (quantize_weight; an FP8 checkpoint's own
  scales are kept as stored);
- the activation, per call: per token (row) by default, s_x[t] = max|x[t, :]| * (1/448) (`activation_scheme
  ="dynamic"`), or one calibrated scale (`input_scale`, `"static"`); x8 = e4m3(clamp(x * (1 / s_x), +-448));
- y[t, n] = (sum_k x8[t, k] W8[n, k]) s_x[t] s_w[n] (+ b[n]), products and sums in float32, then the input's
  dtype. A product of two e4m3 values is exact in float32, so backends differ only in summation order.

Backends by name, as `compiled_llm::linear`'s: `torch` is the reference (dequantized float32 matmul, any
device); `scaled_mm` runs `torch._scaled_mm` (cuBLASLt's FP8 GEMM with a scale per row and per column) where it
takes the shapes; `triton` runs triton_w8a8.py's quantizing kernel, then its tensor-core GEMM for decode rows (up to
64) or cuBLASLt's for more. Each is tested against the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from custom_ops.linear import triton_w8a8
from custom_ops.linear.triton_decode_gemm import MAX_ROWS as DECODE_ROWS
from custom_ops.linear.triton_decode_gemm import decode_gemm
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_available, triton_runs_on

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_AMAX = 1e-12  # an all-zero row or channel: a scale that divides without inf or nan

Fp8LinearFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, Tensor? bias, str backend) -> Tensor"
)
# fp8_linear over activations quantized already (by a fused producer: compiled_llm::add_rms_norm_fp8).
_LIBRARY.define(
    "fp8_linear_quantized(Tensor x8, Tensor x_scale, Tensor weight, Tensor weight_scale, Tensor? bias, "
    "ScalarType out_dtype, str backend) -> Tensor"
)


def round_to_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(v * (1 / s))): a product and one reciprocal, each IEEE-rounded on every device (torch turns a
    CUDA division by a Python number into a product, so a quotient would round differently on CPU and GPU), as
    the Triton kernels compute them."""
    return (values.float() * torch.reciprocal(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def scale_and_round(values: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(round_to_fp8(v, s), s) with s = max(amax, MIN_AMAX) * (1/448)."""
    scale = amax.float().clamp(min=MIN_AMAX) * (1 / FP8_MAX)
    return round_to_fp8(values, scale), scale


# A channel's scale is max|W[n, :]| * c / 448 for the c of these with the least squared rounding error (the first on
# a tie). e4m3's grid is relative, so a scale changes which weights land near a grid point rather than the error's
# size; a slight clip can round the bulk closer at the cost of the largest weight. On SmolLM2-135M this lowers the
# weights' error by ~4% (BENCHMARKS.md, "the weights' scales"); ModelOpt and llm-compressor call it an MSE observer.
WEIGHT_SCALE_CLIPS = (1.0,) + tuple(2 ** (-k / 32) for k in range(1, 9))  # 1 down to 0.84
_SEARCH_CHUNK_VALUES = 1 << 24  # rows searched at a time: bounds the float32 temporaries to ~64 MB each


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [n, k] e4m3, s_w [n] float32) of a weight [n, k], on its device: each channel's scale the one of
    WEIGHT_SCALE_CLIPS x its amax / 448 that rounds it with the least squared error."""
    weight = weight.detach()
    n, k = weight.shape
    amax = weight.abs().amax(dim=1, keepdim=True).float()
    quantized = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scale = torch.empty_like(amax)
    step = max(1, _SEARCH_CHUNK_VALUES // max(k, 1))
    clips = torch.tensor(WEIGHT_SCALE_CLIPS, device=weight.device)
    for start in range(0, n, step):
        rows, row_amax = weight[start : start + step].float(), amax[start : start + step]
        errors = []
        for clip in WEIGHT_SCALE_CLIPS:
            rounded, clipped_scale = scale_and_round(rows, row_amax * clip)
            errors.append((rounded.float() * clipped_scale - rows).square().sum(dim=1, keepdim=True))
        best = clips[torch.cat(errors, dim=1).argmin(dim=1, keepdim=True)]  # argmin: the first of equal errors
        quantized[start : start + step], scale[start : start + step] = scale_and_round(rows, row_amax * best)
    return quantized, scale.view(-1)


def quantize_rows(rows: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [t, k] e4m3, s_x [t, 1] float32) of activations [t, k]: a scale per row, or the static one."""
    if input_scale is None:
        return scale_and_round(rows, rows.abs().amax(dim=-1, keepdim=True))
    scale = input_scale.float().reshape(1, 1).expand(rows.shape[0], 1)
    return round_to_fp8(rows, scale), scale


def _scaled_product(rows8: torch.Tensor, row_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    out = (rows8.float() @ weight.float().t()) * row_scale * weight_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    quantized, scale = quantize_rows(x.reshape(-1, x.shape[-1]), input_scale)
    return _scaled_product(quantized, scale, weight, weight_scale, bias, x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_quantized_reference(x8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                                   weight_scale: torch.Tensor, bias: torch.Tensor | None,
                                   out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """`fp8_linear` after its quantization: x8 [..., K] e4m3 with its row scales x_scale [..., 1]."""
    rows8, row_scale = x8.reshape(-1, x8.shape[-1]), x_scale.reshape(-1, 1).float()
    return _scaled_product(rows8, row_scale, weight, weight_scale, bias, out_dtype).reshape(*x8.shape[:-1], weight.shape[0])


def _takes_scaled_mm(rows: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Shapes and dtypes `torch._scaled_mm` takes with a scale per row and per column: sizes in multiples of
    16 and, on a GPU, FP8 tensor cores (compute capability 8.9: Ada, Hopper and later) and a bf16 output."""
    k, n = weight.shape[1], weight.shape[0]
    if k % 16 or n % 16 or rows.shape[0] == 0 or not weight.is_contiguous():
        return False
    if rows.device.type == "cuda":
        return (out_dtype or rows.dtype) == torch.bfloat16 and fp8_tensor_cores(rows.device.index)
    return rows.device.type == "cpu"


@functools.cache
def fp8_tensor_cores(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: torch.Tensor | None, bias: torch.Tensor | None,
                      quantize=quantize_rows) -> torch.Tensor:  # fmt: skip
    """cuBLASLt's FP8 GEMM (on a CPU, oneDNN's) over the activations `quantize` rounds; where it does not take
    the shapes, the reference."""
    rows = x.reshape(-1, x.shape[-1])
    if not _takes_scaled_mm(rows, weight):
        return fp8_linear_reference(x, weight, weight_scale, input_scale, bias)
    quantized, scale = quantize(rows, input_scale)
    out = torch._scaled_mm(quantized, weight.t(), scale_a=scale.contiguous(), scale_b=weight_scale.view(1, -1),
                           out_dtype=x.dtype)  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def triton_takes(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, scale_shape: tuple[int, ...]) -> bool:  # fmt: skip
    """What the FP8 Triton kernels read: rows [M, K] with a unit last stride (in a float dtype, or e4m3 already),
    a contiguous e4m3 weight [N, K] with contiguous float32 scales of `scale_shape`, an output and bias in a float
    dtype the kernels write."""
    n, k = weight.shape
    return (
        k > 0 and rows.shape[-1] == k and rows.stride(-1) == 1 and triton_runs_on(rows)
        and rows.dtype in (*KERNEL_DTYPES, FP8) and out_dtype in KERNEL_DTYPES
        and weight.dtype == FP8 and weight.is_contiguous() and weight_scale.dtype == torch.float32
        and weight_scale.is_contiguous() and tuple(weight_scale.shape) == scale_shape
        and (bias is None or (bias.is_contiguous() and bias.shape == (n,) and bias.dtype == out_dtype))
    )  # fmt: skip


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One quantizing kernel, then the decode GEMM (up to DECODE_ROWS rows) or cuBLASLt's; what the kernels
    do not take: `scaled_mm`'s path."""
    rows = x.reshape(-1, x.shape[-1])
    if not triton_takes(rows, weight, weight_scale, bias, x.dtype, (weight.shape[0],)):
        return _scaled_mm_linear(x, weight, weight_scale, input_scale, bias)
    if 0 < rows.shape[0] <= DECODE_ROWS:
        quantized, scale = triton_w8a8.quantize_rows(rows, input_scale)
        out = decode_gemm(quantized, weight, bias, x.dtype, scale, weight_scale)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _scaled_mm_linear(x, weight, weight_scale, input_scale, bias, quantize=triton_w8a8.quantize_rows)


def fp8_backend(device: torch.device, linear_backend: str = "auto") -> tuple[str, str]:
    """The backend for a model on `device` under CompileConfig.linear_backend, and why: `triton` (the Triton FP8
    GEMM for decode rows, cuBLASLt's for more) where FP8 tensor cores and triton are there, unless linear_backend is
    `torch`, which keeps to torch's ops: `scaled_mm`; on a CPU the reference (the faster there: oneDNN's FP8 GEMM
    took 14 ms against 8 for [64, 1024] x [1024, 1024])."""
    if device.type == "cuda":
        if not fp8_tensor_cores(device.index):
            return "torch", "no FP8 tensor cores before compute capability 8.9: the reference dequantizes"
        if linear_backend == "torch" or not triton_available():
            why = "linear_backend='torch'" if linear_backend == "torch" else "triton is not installed"
            return "scaled_mm", f"cuBLASLt's FP8 GEMM with row and column scales ({why})"
        return "triton", (f"one quantizing kernel, then a Triton FP8 GEMM for up to {DECODE_ROWS} rows and "
                          "cuBLASLt's for more")
    return "torch", f"the reference on {device.type}"


def _fp8_linear_quantized(x8, x_scale, weight, weight_scale, bias, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The decode GEMM (`triton`, up to DECODE_ROWS rows) or cuBLASLt's GEMM (`triton` and `scaled_mm`) over
    activations a fused producer quantized; the reference where those do not take the shapes."""
    rows8, row_scale = x8.reshape(-1, x8.shape[-1]), x_scale.reshape(-1, 1).float().contiguous()
    n, k = weight.shape
    bias_ok = bias is None or (bias.dtype == out_dtype and bias.is_contiguous() and bias.shape == (n,))
    if backend != "torch" and bias_ok and rows8.shape[-1] == k and x8.dtype == FP8:
        decode_rows = 0 < rows8.shape[0] <= DECODE_ROWS
        if backend == "triton" and decode_rows and triton_takes(rows8, weight, weight_scale, bias, out_dtype, (n,)):
            out = decode_gemm(rows8, weight, bias, out_dtype, row_scale, weight_scale)
            return out.view(*x8.shape[:-1], n)
        if _takes_scaled_mm(rows8, weight, out_dtype):
            out = torch._scaled_mm(rows8, weight.t(), scale_a=row_scale, scale_b=weight_scale.view(1, -1),
                                   out_dtype=out_dtype)  # fmt: skip
            return (out if bias is None else out + bias).view(*x8.shape[:-1], n)
    return fp8_linear_quantized_reference(x8, x_scale, weight, weight_scale, bias, out_dtype)


FP8_LINEAR_BACKENDS: dict[str, Fp8LinearFn] = {
    "torch": fp8_linear_reference, "scaled_mm": _scaled_mm_linear, "triton": _triton_linear,
}


def _fp8_linear(x, weight, weight_scale, input_scale, bias, backend: str) -> torch.Tensor:
    return FP8_LINEAR_BACKENDS[backend](x, weight, weight_scale, input_scale, bias)


def _fp8_linear_fake(x, weight, weight_scale, input_scale, bias, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fp8_linear_quantized_fake(x8, x_scale, weight, weight_scale, bias, out_dtype, backend) -> torch.Tensor:
    return x8.new_empty(*x8.shape[:-1], weight.shape[0], dtype=out_dtype)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("fp8_linear", _fp8_linear, _device)
    _LIBRARY.impl("fp8_linear_quantized", _fp8_linear_quantized, _device)
torch.library.register_fake("compiled_llm::fp8_linear", _fp8_linear_fake, lib=_LIBRARY)
torch.library.register_fake("compiled_llm::fp8_linear_quantized", _fp8_linear_quantized_fake, lib=_LIBRARY)
