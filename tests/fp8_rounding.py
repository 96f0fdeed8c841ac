"""fp8_linear's roundings written out from its definition (custom_ops/linear/fp8.py's docstring), for tests that
hold the op and the passes to it: activations scaled by their amax, weights by the clip of their amax that rounds
each channel with the least squared error."""

from __future__ import annotations

import torch

FP8_MAX = 448.0
CLIPS = [2.0 ** (-k / 32) for k in range(9)]  # the definition's c_n: 1 down to 2^(-1/4)


def e4m3(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(v * (1 / s), +-448)) in float32, back as float64 values times s."""
    quantized = (values.float() * (torch.tensor(1.0) / scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.double() * scale.double()


def amax_scale(values: torch.Tensor, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """max|row| * clip / 448 per row (clip a number or [rows, 1]), in float32 as the op computes it."""
    amax = values.float().abs().amax(dim=-1, keepdim=True)
    return (amax * torch.as_tensor(clip, dtype=torch.float32)).clamp(min=1e-12) * torch.tensor(1 / FP8_MAX)


def e4m3_rows(values: torch.Tensor) -> torch.Tensor:
    """Activations [rows, K] as the op rounds them: a scale per row, max|row| / 448."""
    return e4m3(values, amax_scale(values))


def clip_errors(weight: torch.Tensor) -> torch.Tensor:
    """[N, len(CLIPS)]: each row's squared rounding error (float64) at each clip of its amax."""
    weight = weight.detach()
    return torch.stack([(e4m3(weight, amax_scale(weight, clip)) - weight.double()).square().sum(dim=-1)
                        for clip in CLIPS], dim=-1)  # fmt: skip


def e4m3_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] as the op stores it: each row's scale max|row| * c / 448 for the c of CLIPS whose rounding is
    nearest the row (float64 squared error; the first on a tie)."""
    best = clip_errors(weight).argmin(dim=-1, keepdim=True)  # the first of equal minima
    return e4m3(weight.detach(), amax_scale(weight.detach(), torch.tensor(CLIPS, device=best.device)[best]))
