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


def amax_scale(values: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    return (values.float().abs().amax(dim=-1, keepdim=True) * torch.tensor(clip)).clamp(min=1e-12) * torch.tensor(
        1 / FP8_MAX
    )


def e4m3_rows(values: torch.Tensor) -> torch.Tensor:
    """Activations [rows, K] as the op rounds them: a scale per row, max|row| / 448."""
    return e4m3(values, amax_scale(values))


def e4m3_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] as the op stores it: each row's scale max|row| * c / 448 for the c of CLIPS whose rounding is
    nearest the row (float64 squared error; the first on a tie)."""
    weight = weight.detach()
    best = best_error = None
    for clip in CLIPS:
        rounded = e4m3(weight, amax_scale(weight, clip))
        error = (rounded - weight.double()).square().sum(dim=-1, keepdim=True)
        if best is None:
            best, best_error = rounded, error
        else:
            best = torch.where(error < best_error, rounded, best)
            best_error = torch.minimum(error, best_error)
    return best
