"""`compiled_llm::moe_experts_mxfp4`: `moe_experts` with each expert's weights in MXFP4 (the OCP microscaling 4-bit
float format GPT-OSS checkpoints store experts in), kept in that format and dequantized in the kernel (W4A16).

Layout, in the logical [E, N, K] orientation of the other experts ops (N output rows, K input columns):
- blocks uint8 [E, N, K / 2]: two e2m1 values a byte (1 sign, 2 exponent, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4,
  6 and their negatives), column 2h in the low nibble of byte h, column 2h + 1 in the high one;
- scales uint8 [E, N, K / 32]: an e8m0 exponent for each 32 columns, 2^(s - 127).
W[e, n, k] = e2m1(nibble) * 2^(scales[e, n, k // 32] - 127), exact in bfloat16 and float32.

Numerics: `moe_experts` over the dequantized weights in x's dtype (the reference dequantizes, then runs
moe_experts_reference). Backends: `torch`, that reference; `triton`, triton_moe.py's grouped GEMMs, which read the
bytes of the experts that have tokens and dequantize them in registers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from custom_ops.moe import triton_moe
from custom_ops.moe.op import moe_experts_reference, register_experts_op, triton_takes

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # columns sharing one exponent

_LIBRARY = torch.library.Library("compiled_llm", "FRAGMENT")
_LIBRARY.define(
    "moe_experts_mxfp4(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_blocks, Tensor w13_scales, "
    "Tensor w2_blocks, Tensor w2_scales, Tensor? b13, Tensor? b2, str activation, float[] activation_params, "
    "str backend) -> Tensor"
)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [..., N, K] in `dtype` of MXFP4 `blocks` [..., N, K / 2] and `scales` [..., N, K / 32]."""
    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2).long()  # column 2h, then 2h + 1
    exponents = (scales.to(torch.int32) - 127).repeat_interleave(GROUP, dim=-1)
    return torch.ldexp(table[codes], exponents).to(dtype)


def random_mxfp4(experts: int, n: int, k: int, device=None, generator: torch.Generator | None = None,
                 exponents: tuple[int, int] = (118, 124)) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random valid MXFP4 (blocks, scales) of [experts, n, k] weights on `device` (the generator's, if given): every
    byte, exponents 2^(s - 127) for s in `exponents` (the default: weights of magnitude about 0.01-0.1, a trained
    model's)."""
    if k % GROUP:
        raise ValueError(f"MXFP4 weights need K a multiple of {GROUP}, got {k}")
    device = generator.device if generator is not None else device
    blocks = torch.randint(0, 256, (experts, n, k // 2), dtype=torch.uint8, generator=generator, device=device)
    scales = torch.randint(exponents[0], exponents[1] + 1, (experts, n, k // GROUP), dtype=torch.uint8,
                           generator=generator, device=device)  # fmt: skip
    return blocks, scales


def moe_experts_mxfp4_reference(x, topk_ids, topk_weights, w13_blocks, w13_scales, w2_blocks, w2_scales, b13, b2,
                                activation: str, params: Sequence[float] = ()) -> torch.Tensor:  # fmt: skip
    w13, w2 = (dequantize_mxfp4(b, s, x.dtype) for b, s in ((w13_blocks, w13_scales), (w2_blocks, w2_scales)))
    return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, b13, b2, activation, params)


def _triton_moe_mxfp4(x, topk_ids, topk_weights, w13_blocks, w13_scales, w2_blocks, w2_scales, b13, b2, activation,
                      params):  # fmt: skip
    takes = triton_takes(x, topk_ids, b13, b2, activation) and all(
        t.dtype == torch.uint8 and t.stride(-1) == 1 for t in (w13_blocks, w13_scales, w2_blocks, w2_scales)
    )
    if not takes:
        return moe_experts_mxfp4_reference(x, topk_ids, topk_weights, w13_blocks, w13_scales, w2_blocks, w2_scales,
                                           b13, b2, activation, params)  # fmt: skip
    return triton_moe.fused_moe(x, topk_ids, topk_weights, w13_blocks, w2_blocks, b13, b2, activation, params,
                                mxfp4_scales=(w13_scales, w2_scales))  # fmt: skip


MOE_MXFP4_BACKENDS = {"torch": moe_experts_mxfp4_reference, "triton": _triton_moe_mxfp4}


register_experts_op(_LIBRARY, "moe_experts_mxfp4", MOE_MXFP4_BACKENDS)
