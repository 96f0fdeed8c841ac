"""`compiled_llm::int8_linear`: y = (x * smooth) @ W^T (+ b) with W and the activations in int8 (W8A8, SmoothQuant).

Numerics, which every backend is held to (tests/test_int8_linear.py):
- the weight, once, per output channel, divided by `smooth` first: W' = W / smooth (columns), s_w[n] =
  max|W'[n, :]| * (1/127), W8 = round(W' * (1 / s_w)) (a product and a reciprocal, as fp8.py rounds);
- the activation, per call and per token: x' = x * smooth (float32), s_x[t] = max|x'[t, :]| * (1/127),
  x8 = round(clamp(x' * (1 / s_x), +-127));
- y[t, n] = (sum_k x8[t, k] W8[n, k]) s_x[t] s_w[n] (+ b[n]), the sum an exact integer (|x8 W8| <= 127^2: exact in
  int32 for K up to 2^17, and in float64), scaled in float32, then the input's dtype.
`smooth` [K] float32 or None: SmoothQuant's migration of activation outliers into the weight (fx_passes/
quantize_int8.py calibrates it: smooth_k = 1 / s_k, s_k = max|x_k|^a / max|W_k|^(1 - a)); one row for every output
channel, since x is quantized once for the whole (fused) GEMM.

Backends by name: `torch` is the reference (the integer sum in float64, any device); `int_mm` quantizes with torch ops
and multiplies with `torch._int_mm` (the int8 tensor cores through cuBLASLt on CUDA, x padded to 32 rows there, which
it requires; oneDNN on a CPU); `triton` quantizes in one kernel (triton_w8a8.quantize_rows), then multiplies in
triton_w8a8's decode GEMM for up to MAX_ROWS rows (int32 sums, the scales and bias in its epilogue: one launch where
`int_mm` takes five) or with `torch._int_mm` and one scaling kernel for more. Each takes the reference where it does
not take the shapes.
`int8_linear_quantized` is the op after its quantization, over rows a fused producer wrote (add_rms_norm_int8).
"""

from __future__ import annotations

import torch

from custom_ops.linear import triton_w8a8
from custom_ops.linear.triton_decode_gemm import MAX_ROWS as DECODE_ROWS
from custom_ops.linear.triton_decode_gemm import decode_gemm
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_available, triton_runs_on

INT8_MAX = 127
MIN_AMAX = 1e-12  # an all-zero row or channel: a scale that divides without inf or nan

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? smooth, Tensor? bias, str backend) -> Tensor"
)
_LIBRARY.define(
    "int8_linear_quantized(Tensor x8, Tensor x_scale, Tensor weight, Tensor weight_scale, Tensor? bias, "
    "ScalarType out_dtype, str backend) -> Tensor"
)


def round_to_int8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(clamp(v * (1 / s), +-127)) as int8 (a product and one reciprocal, IEEE-rounded on every device)."""
    return torch.round((values.float() * torch.reciprocal(scale)).clamp(-INT8_MAX, INT8_MAX)).to(torch.int8)


def quantize_weight(weight: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [N, K] int8, s_w [N] float32) of W [N, K] divided by `smooth` per column, on its device."""
    w = weight.detach().float()
    if smooth is not None:
        w = w / smooth.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=MIN_AMAX) * (1 / INT8_MAX)
    return round_to_int8(w, scale), scale.view(-1)


def quantize_rows(rows: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [T, K] int8, s_x [T, 1] float32) of activations [T, K] times `smooth`: a scale per row."""
    rows = rows.float()
    if smooth is not None:
        rows = rows * smooth.float()
    scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) * (1 / INT8_MAX)
    return round_to_int8(rows, scale), scale


def _scaled(sums: torch.Tensor, row_scale, weight_scale, bias, dtype: torch.dtype) -> torch.Tensor:
    out = sums.float() * row_scale * weight_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def int8_linear_quantized_reference(x8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                                    weight_scale: torch.Tensor, bias: torch.Tensor | None,
                                    out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """`int8_linear` after its quantization: x8 [..., K] int8 with its row scales x_scale [..., 1]."""
    rows8, row_scale = x8.reshape(-1, x8.shape[-1]), x_scale.reshape(-1, 1).float()
    sums = rows8.double() @ weight.double().t()  # exact: integers below 2^53
    return _scaled(sums, row_scale, weight_scale, bias, out_dtype).reshape(*x8.shape[:-1], weight.shape[0])


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          smooth: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    rows8, row_scale = quantize_rows(x.reshape(-1, x.shape[-1]), smooth)
    out = int8_linear_quantized_reference(rows8, row_scale, weight, weight_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _takes_int_mm(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """What torch._int_mm multiplies: K and N multiples of 8 (cuBLASLt's int8 GEMM), a contiguous weight."""
    k, n = weight.shape[1], weight.shape[0]
    return rows.shape[0] > 0 and k % 8 == 0 and n % 8 == 0 and weight.is_contiguous() and weight.dtype == torch.int8


def _int_mm_sums(rows8: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    count = rows8.shape[0]
    if rows8.is_cuda and count <= 16:  # cuBLASLt's int8 GEMM takes more than 16 rows: zeros below, their sums unread
        rows8 = torch.nn.functional.pad(rows8, (0, 0, 0, 32 - count))
    return torch._int_mm(rows8, weight.t())[:count]


def _int_mm_linear(x, weight, weight_scale, smooth, bias) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if not _takes_int_mm(rows, weight):
        return int8_linear_reference(x, weight, weight_scale, smooth, bias)
    rows8, row_scale = quantize_rows(rows, smooth)
    out = _scaled(_int_mm_sums(rows8, weight), row_scale, weight_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def triton_takes(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, smooth: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> bool:  # fmt: skip
    """What triton_w8a8's kernels read: rows [M, K] with a unit last stride (in a float dtype, or int8 already), a
    contiguous int8 weight [N, K] with contiguous float32 scales [N], a contiguous float32 smooth [K], an output and
    bias in a float dtype the kernels write; and what torch._int_mm takes (_takes_int_mm), for more rows."""
    n, k = weight.shape
    return (
        rows.shape[-1] == k and rows.stride(-1) == 1 and triton_runs_on(rows) and _takes_int_mm(rows, weight)
        and rows.dtype in (*KERNEL_DTYPES, torch.int8) and out_dtype in KERNEL_DTYPES
        and weight_scale.dtype == torch.float32 and weight_scale.is_contiguous() and weight_scale.shape == (n,)
        and (smooth is None or (smooth.dtype == torch.float32 and smooth.is_contiguous() and smooth.shape == (k,)))
        and (bias is None or (bias.is_contiguous() and bias.shape == (n,) and bias.dtype == out_dtype))
    )  # fmt: skip


def _triton_product(rows8, row_scale, weight, weight_scale, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N] of rows quantized already: the decode GEMM up to MAX_ROWS rows, torch._int_mm for more (its epilogue in
    one kernel)."""
    if rows8.shape[0] <= DECODE_ROWS:
        return decode_gemm(rows8, weight, bias, out_dtype, row_scale, weight_scale)
    return triton_w8a8.scale_sums(_int_mm_sums(rows8, weight), row_scale, weight_scale, bias, out_dtype)


def _triton_linear(x, weight, weight_scale, smooth, bias) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if not triton_takes(rows, weight, weight_scale, smooth, bias, x.dtype):
        return _int_mm_linear(x, weight, weight_scale, smooth, bias)
    rows8, row_scale = triton_w8a8.quantize_rows(rows, None, smooth, torch.int8)
    return _triton_product(rows8, row_scale, weight, weight_scale, bias, x.dtype).view(*x.shape[:-1], weight.shape[0])


def int8_backend(device: torch.device, linear_backend: str = "auto") -> tuple[str, str]:
    """The backend for a model on `device` under CompileConfig.linear_backend, and why."""
    if device.type != "cuda":
        return "torch", f"the reference on {device.type}"
    if linear_backend == "torch" or not triton_available():
        why = "linear_backend='torch'" if linear_backend == "torch" else "triton is not installed"
        return "int_mm", f"torch ops quantize x per token, then torch._int_mm (cuBLASLt's int8 GEMM) ({why})"
    return "triton", (f"one quantizing kernel, then a Triton int8 GEMM for up to {DECODE_ROWS} rows and "
                      "torch._int_mm for more")  # fmt: skip


INT8_LINEAR_BACKENDS = {"torch": int8_linear_reference, "int_mm": _int_mm_linear, "triton": _triton_linear}


def _int8_linear(x, weight, weight_scale, smooth, bias, backend: str) -> torch.Tensor:
    return INT8_LINEAR_BACKENDS[backend](x, weight, weight_scale, smooth, bias)


def _int8_linear_quantized(x8, x_scale, weight, weight_scale, bias, out_dtype: torch.dtype, backend: str):
    rows8, row_scale = x8.reshape(-1, x8.shape[-1]), x_scale.reshape(-1, 1).float().contiguous()
    n = weight.shape[0]
    if backend == "triton" and rows8.shape[0] and triton_takes(rows8, weight, weight_scale, None, bias, out_dtype):
        return _triton_product(rows8, row_scale, weight, weight_scale, bias, out_dtype).view(*x8.shape[:-1], n)
    if backend != "torch" and rows8.shape[0] and _takes_int_mm(rows8, weight):
        return _scaled(_int_mm_sums(rows8, weight), row_scale, weight_scale, bias, out_dtype).view(*x8.shape[:-1], n)
    return int8_linear_quantized_reference(x8, x_scale, weight, weight_scale, bias, out_dtype)


def _int8_linear_fake(x, weight, weight_scale, smooth, bias, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _int8_linear_quantized_fake(x8, x_scale, weight, weight_scale, bias, out_dtype, backend) -> torch.Tensor:
    return x8.new_empty(*x8.shape[:-1], weight.shape[0], dtype=out_dtype)


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("int8_linear", _int8_linear, _device)
    _LIBRARY.impl("int8_linear_quantized", _int8_linear_quantized, _device)
torch.library.register_fake("compiled_llm::int8_linear", _int8_linear_fake, lib=_LIBRARY)
torch.library.register_fake("compiled_llm::int8_linear_quantized", _int8_linear_quantized_fake, lib=_LIBRARY)
