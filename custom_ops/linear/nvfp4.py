"""`compiled_llm::nvfp4_linear`: y = (x * smooth) @ W^T (+ b) with W stored in NVFP4 (weight-only on Hopper, which has no FP4
tensor cores: the kernels dequantize in registers and multiply in the activations' dtype).

Numerics, which every backend is held to (tests/test_nvfp4_linear.py):
- storage: `weight` uint8 [N, K/2], two e2m1 codes a byte, column 2j in the low nibble and 2j + 1 in the high one
  (ModelOpt's and compressed-tensors' order, and int4_linear's); a code is 1 sign, 2 exponent and 1 mantissa bit:
  0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (E2M1);
- `scales` float8_e4m3fn [N, K/16]: a scale per output channel and 16 input columns; `global_scale` float32 [N]: a
  weight's one global scale (ModelOpt's `weight_scale_2`; compressed-tensors stores its reciprocal) repeated per
  output channel, so that fused q/k/v and gate/up keep each part's;
- W[n, k] = e2m1(q[n, k]) * (s[n, k // 16] * g[n]), in float32 (s * g rounds once; its product with e2m1 is exact
  but where it leaves float32's range), ModelOpt's dequantization bit for bit;
- `smooth` [P, K] float32 or None, with `smooth_rows`: AWQ's activation-aware scaling, a row per part of the output
  channels, as int4_linear has it (int4.py; the weight was quantized divided by it);
- y[t, n] = sum_k r(x[t, k] smooth[p(n), k]) W[n, k] (+ b[n]), with r rounding to the input's dtype (as int4_linear
  defines it), other products and sums in float32, then the input's dtype.
Kernels feeding tensor cores take e2m1 * s (exact in bfloat16 and float16: at most 6 significant bits, 2^-10 to 2688)
and apply g to the float32 sum; the GEMV sums r(x * smooth) * e2m1 per 16 columns in float32 and applies s, then g.
So backends differ from the reference by summation order only.

`quantize_weight` is ModelOpt's recipe (NVFP4QTensor.quantize): g = max|W| / (6 * 448), s = e4m3(max|block| / (6 g))
(clamped to e4m3's range, an all-zero block 1), q = the nearest e2m1 value of W / (s g), ties to the even code;
with a smooth, of W / smooth, and with a clip, each block's max bounded by it (the AWQ search of
fx_passes/awq_calibration.py, which quantize_nvfp4 runs over `fake_quantize`).
Backends by name: `torch` is the reference (any device); `triton` runs triton_nvfp4.py's kernels (a CUDA-core GEMV
for one row, a tensor-core GEMM for more), the reference where they do not take the shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from custom_ops.linear.int4 import (
    KERNELS,
    dequantizing_backend,
    kernel_takes_smooth,
    pack_codes,
    smoothed_linear,
    unpack_codes,
)
from custom_ops.triton_runtime import KERNEL_DTYPES, triton_runs_on

BLOCK = 16  # input columns a scale
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN = 2.0**-9  # e4m3's smallest subnormal: ModelOpt clamps a block's scale to it
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Halfway between neighbouring magnitudes; a tie rounds to the even code (mantissa bit 0), as cvt.rn does.
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

Nvfp4LinearFn = Callable[..., torch.Tensor]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "nvfp4_linear(Tensor x, Tensor weight, Tensor scales, Tensor global_scale, Tensor? smooth, int[] smooth_rows, "
    "Tensor? bias, str backend) -> Tensor"
)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15) -> their E2M1 values in float32."""
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    magnitude = table[(codes & 7).long()]
    return torch.where(codes >= 8, -magnitude, magnitude)


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 code (uint8 0..15) of each float32 value, ties to the even code, saturating at 6, the sign
    bit set for any negative value (ModelOpt's codes, bit for bit)."""
    magnitude = values.abs()
    bounds = torch.tensor(_BOUNDS, device=values.device)
    code = torch.bucketize(magnitude, bounds, right=True)  # a tie rounds up ...
    tie = (code > 0) & (magnitude == bounds[(code - 1).clamp(min=0)])
    code = code - (tie & (code % 2 == 1)).long()  # ... unless the code above is odd
    return (code | (values < 0).long() * 8).to(torch.uint8)  # a negative value that rounds to 0 keeps its sign


def e2m1_round(values: torch.Tensor) -> torch.Tensor:
    """e2m1_values(e2m1_codes(values)) without the codes (AWQ's search rounds each weight many times): E2M1's grid is
    steps of 0.5 below 2, of 1 below 4, then 4 and 6, and round-half-to-even at each step is a tie to the even code."""
    magnitude = values.abs()
    rounded = torch.where(magnitude < 2, torch.round(magnitude * 2) / 2,
                          torch.where(magnitude < 4, torch.round(magnitude), torch.round(magnitude / 2) * 2))  # fmt: skip
    return torch.copysign(rounded.clamp(max=E2M1_MAX), values)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """W [N, K] in float32, as the numerics above define it."""
    values = e2m1_values(unpack_codes(weight))
    return values * (scales.float() * global_scale.float()[:, None]).repeat_interleave(BLOCK, 1)


def quantize_weight(weight: torch.Tensor, smooth: torch.Tensor | None = None, clip: torch.Tensor | None = None,
                    global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(weight uint8 [N, K/2], scales float8_e4m3fn [N, K/16], global_scale float32 [N], one value) of W [N, K] (divided
    by `smooth` [K] or [N, K] per column, each block's max bounded by `clip` [N, K/16], where given) by ModelOpt's
    recipe (module docstring), on W's device. `global_scale` [1]: the one to round with instead of W's own (rows of
    a fused weight, rounded as the whole was: the whole's, global_scale_for its max)."""
    codes, scales, global_scale = _round(weight, smooth, clip, global_scale=global_scale)
    return pack_codes(codes.view(weight.shape)), scales, global_scale.expand(weight.shape[0]).contiguous()


def fake_quantize(weight: torch.Tensor, group_size: int, smooth: torch.Tensor | None = None,
                  clip: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """dequantize(*quantize_weight(weight, smooth, clip)) [N, K] without packing the codes: what AWQ's search compares,
    many times a weight (int4.fake_quantize's signature; `group_size` must be NVFP4's 16)."""
    if group_size != BLOCK:
        raise ValueError(f"NVFP4 scales blocks of {BLOCK} columns, not {group_size}")
    values, scales, global_scale = _round(weight, smooth, clip, codes=False)
    return (values * (scales.float() * global_scale)[..., None]).view(weight.shape)


def global_scale_for(weight_max: torch.Tensor) -> torch.Tensor:
    """ModelOpt's global scale [1] of a weight (divided by its smooth) whose largest magnitude is `weight_max` (float32):
    max|W| / (6 * 448)."""
    # An all-zero weight: any global scale (ModelOpt's 0 would make every block's scale 0 / 0)
    return torch.where(weight_max > 0, weight_max / (E2M1_MAX * E4M3_MAX), 1.0).reshape(1)


def _round(weight: torch.Tensor, smooth, clip, codes: bool = True,
           global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """quantize_weight's codes [N, K/16, 16] (or with `codes` False their E2M1 values), e4m3 scales [N, K/16] and
    global scale [1] (W's own, or `global_scale`)."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"NVFP4 blocks of {BLOCK} columns do not tile a weight of {k} columns")
    w = weight.detach().float()
    if smooth is not None:
        w = w / smooth.float()
    global_scale = global_scale_for(w.abs().amax()) if global_scale is None else global_scale.float().reshape(1)
    blocks = w.view(n, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    if clip is not None:
        amax = torch.minimum(amax, clip.float())
    scale = amax / (E2M1_MAX * global_scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scales = scale.clamp(E4M3_MIN, E4M3_MAX).to(torch.float8_e4m3fn)
    divided = blocks / (scales.float() * global_scale)[..., None]
    return (e2m1_codes(divided) if codes else e2m1_round(divided)), scales, global_scale


def nvfp4_linear_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                           smooth: torch.Tensor | None, smooth_rows: list[int],
                           bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    return smoothed_linear(x, dequantize(weight, scales, global_scale), smooth, smooth_rows, bias)


def triton_takes(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                 smooth: torch.Tensor | None, smooth_rows: list[int], bias: torch.Tensor | None) -> bool:  # fmt: skip
    """What triton_nvfp4's kernels read: rows [M, K] with a unit last stride in a float dtype they write, contiguous
    packed codes [N, K/2] (4-byte aligned rows, read as words), contiguous e4m3 scales [N, K/16], float32 global
    scales [N], a smooth as int4's kernels take it (int4.kernel_takes_smooth) and a bias [N] in the rows' dtype; K a
    multiple of 64 (the GEMM's smallest tile)."""
    n, half = weight.shape
    k = 2 * half
    return (
        k > 0 and k % 64 == 0 and rows.shape[-1] == k and rows.stride(-1) == 1 and triton_runs_on(rows)
        and rows.dtype in KERNEL_DTYPES and weight.dtype == torch.uint8 and weight.is_contiguous()
        and weight.data_ptr() % 4 == 0 and scales.dtype == torch.float8_e4m3fn and scales.is_contiguous()
        and tuple(scales.shape) == (n, k // BLOCK) and global_scale.dtype == torch.float32
        and global_scale.shape == (n,) and global_scale.is_contiguous() and kernel_takes_smooth(smooth, smooth_rows, n, k)
        and (bias is None or (bias.is_contiguous() and bias.shape == (n,) and bias.dtype == rows.dtype))
    )  # fmt: skip


def _triton_linear(x, weight, scales, global_scale, smooth, smooth_rows: list[int], bias) -> torch.Tensor:
    from custom_ops.linear import triton_nvfp4

    rows = x.reshape(-1, x.shape[-1])
    args = (weight, scales, global_scale, smooth, smooth_rows, bias)
    if rows.shape[0] == 0 or not triton_takes(rows, *args):
        return nvfp4_linear_reference(x, *args)
    launch = triton_nvfp4.nvfp4_gemv if rows.shape[0] == 1 else triton_nvfp4.nvfp4_gemm
    return launch(rows, *args).view(*x.shape[:-1], weight.shape[0])


def nvfp4_backend(device: torch.device, linear_backend: str = "auto") -> tuple[str, str]:
    """The backend for a model on `device` under CompileConfig.linear_backend, and why."""
    return dequantizing_backend(device, linear_backend, KERNELS)


NVFP4_LINEAR_BACKENDS: dict[str, Nvfp4LinearFn] = {"torch": nvfp4_linear_reference, "triton": _triton_linear}


def _nvfp4_linear(x, weight, scales, global_scale, smooth, smooth_rows, bias, backend: str) -> torch.Tensor:
    return NVFP4_LINEAR_BACKENDS[backend](x, weight, scales, global_scale, smooth, smooth_rows, bias)


def _nvfp4_linear_fake(x, weight, scales, global_scale, smooth, smooth_rows, bias, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("nvfp4_linear", _nvfp4_linear, _device)
torch.library.register_fake("compiled_llm::nvfp4_linear", _nvfp4_linear_fake, lib=_LIBRARY)
