"""`compiled_llm::fp8_block_linear`: y = x @ W^T (+ b) with W in float8 e4m3 scaled per 128 x 128 block and x
quantized per token in groups of 128 columns (W8A8 as DeepSeek-V3 checkpoints store and run it).

Numerics, which every backend is held to (tests/test_fp8_block_linear.py), with fp8.scale_and_round's rounding
(s = max(amax, 1e-12) * (1/448), v8 = e4m3(clamp(v * (1 / s)))):
- the weight, once: a scale per block, s_w[i, j] = amax(W[128i:128i+128, 128j:128j+128]) * (1/448), [ceil(N/128),
  ceil(K/128)] float32 (a partial last block scales by its own amax);
- the activation, per call: a scale per token and group, s_x[t, j] = amax(x[t, 128j:128j+128]) * (1/448);
- y[t, n] = sum over groups j, in order, of (sum_k in j x8[t, k] W8[n, k]) * s_x[t, j] * s_w[n // 128, j], each group's
  products summed in float32 and scaled before the next group is added ("promotion": no FP8 accumulator runs
  across groups), then + b[n] in float32 and the input's dtype. Backends differ only in the order within a group.

Backends: `torch` is the reference (float32, any device); `triton` runs triton_fp8_block.py's kernel, a block-scaled
GEMM on the FP8 tensor cores that quantizes x's groups as it loads them (one kernel a linear).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from custom_ops.linear.fp8 import fp8_tensor_cores, scale_and_round, triton_takes
from custom_ops.triton_runtime import triton_available

BLOCK = 128  # weight blocks are BLOCK x BLOCK, activation groups 1 x BLOCK

Fp8BlockLinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define("fp8_block_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str backend) -> Tensor")


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def quantize_weight_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [n, k] e4m3, s_w [ceil(n/128), ceil(k/128)] float32) of a weight [n, k], on its device."""
    n, k = weight.shape
    padded = F.pad(weight.detach().float(), (0, _blocks(k) * BLOCK - k, 0, _blocks(n) * BLOCK - n))
    blocks = padded.view(_blocks(n), BLOCK, _blocks(k), BLOCK)
    quantized, scale = scale_and_round(blocks, blocks.abs().amax(dim=(1, 3), keepdim=True))
    return quantized.view(padded.shape)[:n, :k].contiguous(), scale.view(_blocks(n), _blocks(k))


def quantize_row_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [t, k] e4m3, s_x [t, ceil(k/128)] float32) of activations [t, k]."""
    t, k = rows.shape
    groups = F.pad(rows.float(), (0, _blocks(k) * BLOCK - k)).view(t, _blocks(k), BLOCK)
    quantized, scale = scale_and_round(groups, groups.abs().amax(dim=-1, keepdim=True))
    return quantized.view(t, -1)[:, :k], scale.view(t, _blocks(k))


def fp8_block_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    rows = x.reshape(-1, x.shape[-1])
    quantized, scale = quantize_row_groups(rows)
    n, k = weight.shape
    weight_scale = weight_scale.float().repeat_interleave(BLOCK, dim=0)[:n]  # [n, groups]: each row's block scales
    out = rows.new_zeros(rows.shape[0], n, dtype=torch.float32)
    for group in range(_blocks(k)):
        cols = slice(group * BLOCK, min(k, (group + 1) * BLOCK))
        partial = quantized[:, cols].float() @ weight[:, cols].float().t()
        out += partial * scale[:, group : group + 1] * weight_scale[:, group]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    rows = x.reshape(-1, x.shape[-1])
    n, k = weight.shape
    if rows.shape[0] == 0 or not triton_takes(rows, weight, weight_scale, bias, x.dtype, (_blocks(n), _blocks(k))):
        return fp8_block_linear_reference(x, weight, weight_scale, bias)
    from custom_ops.linear.triton_fp8_block import fp8_block_gemm

    return fp8_block_gemm(rows, weight, weight_scale, bias).view(*x.shape[:-1], weight.shape[0])


def fp8_block_backend(device: torch.device, linear_backend: str = "auto") -> tuple[str, str]:
    """The backend for a model on `device`, and why: the Triton kernel where FP8 tensor cores run it (compute
    capability 8.9+) and linear_backend allows it (not `torch`); else the reference (torch has no block-scaled FP8
    GEMM)."""
    if device.type != "cuda":
        return "torch", f"the reference on {device.type}"
    if not fp8_tensor_cores(device.index):
        return "torch", "no FP8 tensor cores before compute capability 8.9: the reference dequantizes"
    if linear_backend == "torch" or not triton_available():
        why = "linear_backend='torch'" if linear_backend == "torch" else "triton is not installed"
        return "torch", f"the reference ({why})"
    return "triton", "a block-scaled FP8 GEMM in Triton that quantizes x's 128-column groups as it loads them"


FP8_BLOCK_LINEAR_BACKENDS: dict[str, Fp8BlockLinearFn] = {"torch": fp8_block_linear_reference, "triton": _triton_linear}


def _fp8_block_linear(x, weight, weight_scale, bias, backend: str) -> torch.Tensor:
    return FP8_BLOCK_LINEAR_BACKENDS[backend](x, weight, weight_scale, bias)


def _fp8_block_linear_fake(x, weight, weight_scale, bias, backend: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("fp8_block_linear", _fp8_block_linear, _device)
torch.library.register_fake("compiled_llm::fp8_block_linear", _fp8_block_linear_fake, lib=_LIBRARY)
