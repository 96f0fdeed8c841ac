"""The Triton kernels of triton_silu_mul.py (its launchers; the numerics are silu_mul_fp8.py's and silu_mul_int8.py's):
one program per row, or per row and block of columns. Importing this module needs triton; the launchers import it on
first use."""

import triton
import triton.language as tl

from custom_ops.linear.triton_w8a8_kernels import store_quantized_row


@triton.jit
def silu_mul_kernel(x_ptr, y_ptr, N, stride_x, stride_y, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)  # rounded where F.silu rounds
    tl.store(y_ptr + row * stride_y + cols, (act * up).to(dtype), mask=mask)


@triton.jit
def silu_mul_quantized_kernel(
    x_ptr, smooth_ptr, q_ptr, s_ptr, N, stride_x, stride_q, BLOCK: tl.constexpr, INT8: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, USE_PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr = False,
):  # fmt: skip
    """silu(gate) * up of a row written as an FP8 (e4m3) or int8 linear's input (times its smooth, where given)."""
    if USE_PDL and not LATE_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    h = (act * up).to(dtype).to(tl.float32)  # the activation silu_mul_kernel writes, then the linear's rounding
    if HAS_SMOOTH:  # SmoothQuant's, of the down projection
        h = h * tl.load(smooth_ptr + cols, mask=mask, other=0.0)
    store_quantized_row(h, s_ptr, q_ptr + row * stride_q + cols, s_ptr + row, mask, False, INT8)
    if USE_PDL and LATE_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
