"""Image and latent quality metrics shared by the demo, the benchmarks and the tests (torch only)."""

from __future__ import annotations

import math

import torch

__all__ = ["psnr"]


def psnr(reference: torch.Tensor, other: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio of ``other`` against ``reference`` in dB; ``inf`` when they are equal.

    ``data_range`` is the peak: 1.0 for images in [0, 1], 2.0 in [-1, 1]; for latents, which have no fixed
    range, pass the reference's own range (``reference.max() - reference.min()``).

    Example:
        >>> round(psnr(torch.zeros(4), torch.full((4,), 0.1), data_range=1.0), 1)
        20.0
    """
    mse = (reference.double() - other.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
