"""The Triton kernel of `compiled_llm::rms_norm`, `add_rms_norm` and the norms writing quantized activations
(`add_rms_norm_fp8`, `add_rms_norm_int8`): one program per row (op.py launches it). Importing this module needs
triton; op.py imports it on first use."""

import triton
import triton.language as tl

from custom_ops.linear.triton_w8a8_kernels import store_quantized_row


@triton.jit
def rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, scale_ptr, smooth_ptr, stride_x, stride_r, stride_out, stride_sum, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, QUANTIZED_OUT: tl.constexpr, INT8: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, USE_PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr = False,
):  # fmt: skip
    if USE_PDL and not LATE_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # issued with x's load, not after the sum
    if USE_PDL:  # the weight is no kernel's output; x and the residual may be the previous kernel's
        tl.extra.cuda.gdc_wait()
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:  # the sum is rounded to x's dtype, as the model's own add would be, before the norm reads it
        h = (h.to(tl.float32) + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        h = h.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, h, mask=mask)
    x_dtype = h.dtype
    h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    normed = (h * rstd).to(x_dtype).to(tl.float32)
    if QUANTIZED_OUT:  # e4m3 or int8 with its row's scale, rounded as fp8/int8.quantize_rows round the output
        y = (w * normed).to(x_dtype).to(tl.float32)
        if HAS_SMOOTH:  # SmoothQuant's, of the linear the norm feeds
            y = y * tl.load(smooth_ptr + cols, mask=mask, other=0.0)
        store_quantized_row(y, scale_ptr, out_ptr + row * stride_out + cols, scale_ptr + row, mask, False, INT8)
    else:
        tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)
    if USE_PDL and LATE_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
