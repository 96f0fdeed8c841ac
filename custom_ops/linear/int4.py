"""`compiled_llm::int4_linear`: y = (x * smooth) @ W^T (+ b) with W stored in 4 bits per weight (W4A16, as AWQ and
GPTQ store it): unsigned codes with a scale and a zero point per output channel and group of `group_size` input
columns.

Numerics, which every backend is held to (tests/test_int4_linear.py):
- storage: `qweight` uint8 [N, K/2], two codes a byte, column 2j in the low nibble and 2j + 1 in the high one (so
  the bytes read as little-endian int32 words hold columns 8i..8i+7 in nibbles 0..7); `scales` [N, K/G] in a float
  dtype; `zeros` [N, K/G]: uint8 zero points (AWQ's, GPTQ's: 4-bit, 0-15), or in a float dtype offsets m (GGUF's Q4_1);
- W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G], in float32 (q - z is a small integer: exact in any float), or
  with offsets q s + m (a product, then a sum, as gguf's dequantizer computes them);
- `smooth` [P, K] float32 or None: AWQ's activation-aware scaling, x[t, k] * smooth[p, k] for the output channels
  of part p, the `smooth_rows[p]` channels after part p - 1's (the weight was quantized multiplied by 1 / smooth, so
  that the columns that meet large activations keep more precision). A fused weight (q/k/v, gate/up) has a part per
  projection: one scaling shared by the parts measured 4.5 points of perplexity worse on SmolLM2 (BENCHMARKS.md);
- y[t, n] = sum_k r(x[t, k] smooth[p(n), k]) W[n, k] (+ b[n]), with r rounding to the input's dtype (what a tensor
  core is fed), other products and sums in float32, then the input's dtype.
Kernels feeding tensor cores take the exact q - z and apply the scale per group, in float32, to the group's float32
sum; so backends differ from the reference by summation order only.

`quantize_weight` is round-to-nearest over each group's range, with zero points (AWQ's storage, 'zero_point=True')
or, as int4_awq stores its own calibration, float offsets: no zero point rounded onto the grid, which measured 18% less
KL divergence from the float SmolLM2-135M (BENCHMARKS.md). The search for `smooth` is fx_passes/awq_calibration.py's.
Backends by name: `torch` is the reference (any device); `triton` runs triton_int4.py's kernels (a CUDA-core GEMV
for one row that dequantizes 8 columns a 32-bit load, a tensor-core GEMM for more), the reference where they do not
take the shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from custom_ops.triton_runtime import KERNEL_DTYPES, triton_available, triton_runs_on

GROUP_SIZE = 128  # AWQ's and GPTQ's usual group
MAX_CODE = 15

Int4LinearFn = Callable[..., torch.Tensor]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? smooth, int[] smooth_rows, Tensor? bias, "
    "int group_size, str backend) -> Tensor"
)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15), K even -> bytes [N, K/2], column 2j in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """pack_codes' inverse: bytes [N, K/2] -> uint8 codes [N, K]."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [N, K] in float32, as the numerics above define it."""
    n = qweight.shape[0]
    # Groups broadcast against their scale and zero (no [N, K] copies of them: the reference runs every call on CPU)
    codes = unpack_codes(qweight).view(n, -1, group_size).float()
    scale = scales.float().unsqueeze(-1)
    if zeros.is_floating_point():  # offsets: w = q s + m
        return (codes * scale + zeros.float().unsqueeze(-1)).view(n, -1)
    return ((codes - zeros.float().unsqueeze(-1)) * scale).view(n, -1)


def quantize_weight(weight: torch.Tensor, group_size: int = GROUP_SIZE, smooth: torch.Tensor | None = None,
                    scale_dtype: torch.dtype | None = None, clip: torch.Tensor | None = None, offsets: bool = False,
                    grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(qweight, scales, zeros) of W [N, K] (times 1 / smooth per column, where given), round to nearest per group of
    `group_size` columns over the group's range [min, max]:
    - zero points (AWQ's and GPTQ's storage): the range widened to hold 0, s = (max - min) / 15 rounded to
      `scale_dtype` (the weight's by default), z = round(-min / s) in 0..15 (uint8), q = clamp(round(W / s) + z, 0, 15);
    - `offsets` (int4_awq's own storage, GGUF Q4_1's form): s as above over the group's own range, m = min rounded to
      `scale_dtype`, q = clamp(round((W - m) / s), 0, 15): no rounded zero point moves the grid off the range.
    Both use the stored s (and m). `clip` [N, K / group_size]: bounds of each group's range, +-clip (AWQ's clipping
    search: the few largest weights give up some accuracy for the rest's finer steps). `grid` [N, K / group_size, 2]
    (offsets only): each group's s and m as a search fitted them (fx_passes/awq_calibration.py's least squares), used
    in place of the range's."""
    n, k = weight.shape
    codes, scales, zeros = round_groups(weight, group_size, smooth, scale_dtype, clip, offsets, grid)
    return pack_codes(codes.view(n, k)), scales, zeros if offsets else zeros.to(torch.uint8)


def fake_quantize(weight: torch.Tensor, group_size: int, smooth: torch.Tensor | None = None,
                  clip: torch.Tensor | None = None, offsets: bool = False,
                  grid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """dequantize(*quantize_weight(weight, group_size, smooth, torch.float32, clip, offsets, grid)) [N, K] without
    packing the codes: what a search over smooths and clips compares, many times a weight."""
    codes, scales, zeros = round_groups(weight, group_size, smooth, torch.float32, clip, offsets, grid)
    if offsets:
        return (codes * scales[..., None] + zeros[..., None]).view(weight.shape)
    return ((codes - zeros[..., None]) * scales[..., None]).view(weight.shape)


def fake_quantize_with_offsets(weight: torch.Tensor, group_size: int, smooth: torch.Tensor | None = None,
                               clip: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """fake_quantize of int4_awq's storage (offsets), as fx_passes/awq_calibration.py's search rounds."""
    return fake_quantize(weight, group_size, smooth, clip, offsets=True)


def round_groups(weight: torch.Tensor, group_size: int, smooth: torch.Tensor | None, scale_dtype: torch.dtype | None,
                 clip: torch.Tensor | None, offsets: bool,
                 grid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """quantize_weight's codes [N, K / G, G] as floats, its scales, and its zeros [N, K / G] (as floats) or offsets,
    unpacked: also what a search that refits the grids rounds with (fx_passes/awq_calibration.fit_grid)."""
    n, k = weight.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"int4 groups of {group_size} columns do not tile a weight of {k} columns")
    if grid is not None and not offsets:
        raise ValueError("a fitted grid (scales and offsets) needs offsets=True: zero points are integer codes")
    w = weight.detach().float()
    if smooth is not None:  # [K], or [N, K] (a part's row for each of its channels)
        w = w / smooth.float()
    groups = w.view(n, k // group_size, group_size)
    if grid is not None:  # a fitted grid's own s and m: no range, no clip
        step, low = grid[..., 0].float(), grid[..., 1].float()
    else:
        high, low = groups.amax(dim=-1), groups.amin(dim=-1)
        if not offsets:
            high, low = high.clamp(min=0), low.clamp(max=0)
        if clip is not None:
            high, low = torch.minimum(high, clip.float()), torch.maximum(low, -clip.float())
        step = (high - low) / MAX_CODE
    dtype = scale_dtype or weight.dtype
    # A range that rounds to a zero scale in `dtype` (all equal, or below float16's smallest step): the smallest normal
    # scale instead, so that no code is 0 / 0.
    scales = step.to(dtype).clamp(min=torch.finfo(dtype).smallest_normal)
    stored = scales.float()
    if offsets:
        minimum = low.to(dtype)
        codes = torch.round((groups - minimum.float()[..., None]) / stored[..., None]).clamp(0, MAX_CODE)
        return codes, scales, minimum
    zeros = torch.round(-low / stored).clamp(0, MAX_CODE)
    codes = (torch.round(groups / stored[..., None]) + zeros[..., None]).clamp(0, MAX_CODE)
    return codes, scales, zeros


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          smooth: torch.Tensor | None, smooth_rows: list[int], bias: torch.Tensor | None,
                          group_size: int) -> torch.Tensor:  # fmt: skip
    weight = dequantize(qweight, scales, zeros, group_size)
    return smoothed_linear(x, weight, smooth, smooth_rows, bias)


def smoothed_linear(x: torch.Tensor, weight: torch.Tensor, smooth: torch.Tensor | None, smooth_rows: list[int],
                    bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """x @ W^T (+ b) in float32, then x's dtype, for a dequantized float32 W [N, K]: each part of `smooth_rows` output
    channels over x times its row of `smooth` (the 4-bit formats' references)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if smooth is None:
        out = rows @ weight.t()
    else:
        check_smooth_rows(smooth, smooth_rows, weight.shape[0])
        parts = weight.split(list(smooth_rows))
        # x * smooth rounded to x's dtype: what a tensor core is fed, so every backend rounds it (a float32 product
        # in the reference alone put Llama-8B's int4_awq prefill past the self-check's bf16 tolerance, 0.41 vs 0.36)
        out = torch.cat([(rows * scaling.float()).to(x.dtype).float() @ part.t() for scaling, part in zip(smooth, parts)],
                        dim=-1)  # fmt: skip
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def check_smooth_rows(smooth: torch.Tensor, smooth_rows: list[int], n: int) -> None:
    if smooth.dim() != 2 or len(smooth_rows) != smooth.shape[0] or sum(smooth_rows) != n:
        raise ValueError(
            f"a 4-bit linear's smooth {list(smooth.shape)} with smooth_rows {list(smooth_rows)} does not cover "
            f"the weight's {n} output channels (a row of smooth a part, the parts' channels summing to N)"
        )


def triton_takes(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 smooth: torch.Tensor | None, smooth_rows: list[int], bias: torch.Tensor | None,
                 group_size: int) -> bool:  # fmt: skip
    """What triton_int4's kernels read: rows [M, K] with a unit last stride in a float dtype they write, contiguous
    packed codes [N, K/2] (4-byte aligned rows, read as words), scales and zeros [N, K/G], a contiguous float32 smooth
    [P, K] of up to 3 parts of a multiple of 16 channels each (a program's channels in one part) and a bias [N] in the
    rows' dtype; groups of a power of 2 of at least 16 columns (the kernels' tiles)."""
    n, half = qweight.shape
    k = 2 * half
    return (
        k > 0 and rows.shape[-1] == k and rows.stride(-1) == 1 and triton_runs_on(rows) and rows.dtype in KERNEL_DTYPES
        and group_size >= 16 and group_size & (group_size - 1) == 0 and k % group_size == 0 and half % 4 == 0 and qweight.data_ptr() % 4 == 0
        and qweight.dtype == torch.uint8 and qweight.is_contiguous()
        and scales.is_contiguous() and scales.dtype in KERNEL_DTYPES and zeros.is_contiguous()
        and zeros.dtype in (torch.uint8, *KERNEL_DTYPES)
        and tuple(scales.shape) == tuple(zeros.shape) == (n, k // group_size)
        and kernel_takes_smooth(smooth, smooth_rows, n, k)
        and (bias is None or (bias.is_contiguous() and bias.shape == (n,) and bias.dtype == rows.dtype))
    )  # fmt: skip


def kernel_takes_smooth(smooth: torch.Tensor | None, smooth_rows: list[int], n: int, k: int) -> bool:
    """What the 4-bit kernels read of a smooth: none, or a contiguous float32 [P, K] of up to 3 parts of a multiple of
    16 channels each (a program's channels in one part)."""
    return smooth is None or (
        smooth.is_contiguous() and smooth.dtype == torch.float32 and smooth.dim() == 2 and smooth.shape[1] == k
        and len(smooth_rows) == smooth.shape[0] <= 3 and sum(smooth_rows) == n and all(r % 16 == 0 for r in smooth_rows)
    )  # fmt: skip


def _triton_linear(x, qweight, scales, zeros, smooth, smooth_rows: list[int], bias, group_size: int) -> torch.Tensor:
    from custom_ops.linear import triton_int4

    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0 or not triton_takes(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size):
        return int4_linear_reference(x, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)
    if rows.shape[0] == 1:
        out = triton_int4.int4_gemv(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)
    else:
        out = triton_int4.int4_gemm(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)
    return out.view(*x.shape[:-1], qweight.shape[0])


KERNELS = ("kernels that dequantize in registers: up to 16 rows a Gluon tensor-core decode (gluon_int4.py), more a "
           "Triton tensor-core GEMM")


def int4_backend(device: torch.device, linear_backend: str = "auto") -> tuple[str, str]:
    """The backend for a model on `device` under CompileConfig.linear_backend, and why."""
    return dequantizing_backend(device, linear_backend, KERNELS)


def dequantizing_backend(device: torch.device, linear_backend: str, kernels: str) -> tuple[str, str]:
    """A weight-only format's backend under CompileConfig.linear_backend and why: `triton` (its `kernels`) on CUDA
    where triton is installed, else `torch`, the reference."""
    if device.type == "cuda" and linear_backend != "torch" and triton_available():
        return "triton", kernels
    why = "linear_backend='torch'" if linear_backend == "torch" else (
        "triton is not installed" if device.type == "cuda" else f"on {device.type}")  # fmt: skip
    return "torch", f"the reference, which dequantizes each weight per call ({why})"


INT4_LINEAR_BACKENDS: dict[str, Int4LinearFn] = {"torch": int4_linear_reference, "triton": _triton_linear}


def _int4_linear(x, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int, backend: str) -> torch.Tensor:
    return INT4_LINEAR_BACKENDS[backend](x, qweight, scales, zeros, smooth, smooth_rows, bias, group_size)


def _int4_linear_fake(
    x, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int, backend: str
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("int4_linear", _int4_linear, _device)
torch.library.register_fake("compiled_llm::int4_linear", _int4_linear_fake, lib=_LIBRARY)
