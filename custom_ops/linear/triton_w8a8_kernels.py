"""The Triton kernels of 8-bit weights and activations (triton_w8a8.py's launchers; the numerics are fp8.py's and
int8.py's), and the per-row rounding every kernel that writes W8A8 activations shares (store_quantized_row: here and
in the RMSNorm's epilogue, custom_ops/rms_norm/triton_kernel.py). Importing this module needs triton; the launchers
import it on first use. The kernels write fp8.FP8_MAX (448), int8.INT8_MAX (127) and MIN_AMAX (1e-12) as literals: a
jitted function reads no globals but other jitted functions."""

import triton
import triton.language as tl


@triton.jit
def round_half_to_even(v):
    """v (float32, |v| < 2^22) rounded to the nearest integer, ties to even, as torch.round and libdevice's rint
    (which Triton's interpreter cannot run) round."""
    below = tl.floor(v)
    rest = v - below  # exact
    odd = (below.to(tl.int32) & 1) == 1
    return tl.where((rest > 0.5) | ((rest == 0.5) & odd), below + 1.0, below)


@triton.jit
def store_quantized_row(x, input_scale_ptr, q_ptrs, scale_ptr, mask, STATIC: tl.constexpr, INT8: tl.constexpr):
    """x [BLOCK] float32, a row (zeros where `mask` is off): its scale (the static one at input_scale_ptr, else
    max|x| / 448 or / 127) at scale_ptr and its values clamped, times the scale's IEEE reciprocal, at q_ptrs: e4m3
    rounded to nearest, or int8 rounded half to even (torch.round's rounding)."""
    if STATIC:
        scale = tl.load(input_scale_ptr).to(tl.float32)
    elif INT8:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * (1.0 / 127.0)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * (1.0 / 448.0)
    if INT8:
        q = round_half_to_even(tl.clamp(x * tl.math.div_rn(1.0, scale), -127.0, 127.0)).to(tl.int8)
    else:
        q = tl.clamp(x * tl.math.div_rn(1.0, scale), -448.0, 448.0).to(tl.float8e4nv)
    tl.store(q_ptrs, q, mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def quantize_rows_kernel(
    x_ptr, input_scale_ptr, smooth_ptr, q_ptr, s_ptr, stride_x, stride_q,
    K: tl.constexpr, BLOCK: tl.constexpr, STATIC: tl.constexpr, HAS_SMOOTH: tl.constexpr, INT8: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(smooth_ptr + cols, mask=mask, other=0.0)
    store_quantized_row(x, input_scale_ptr, q_ptr + row * stride_q + cols, s_ptr + row, mask, STATIC, INT8)


@triton.jit
def scale_sums_kernel(
    sums_ptr, x_scale_ptr, w_scale_ptr, b_ptr, y_ptr, M, N, stride_sm, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """y [M, N] = (int32 sums [M, N] as float32) * s_x[m] * s_w[n] (+ b[n]) in y's dtype: torch._int_mm's epilogue in
    one pass over the sums (torch ops take four, each a pass over [M, N])."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    mask = row_ok[:, None] & col_ok[None, :]
    sums = tl.load(sums_ptr + rows[:, None].to(tl.int64) * stride_sm + cols[None, :], mask=mask, other=0)
    out = sums.to(tl.float32) * tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)[:, None] * w_scale[None, :]
    if HAS_BIAS:
        out += bias[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)
