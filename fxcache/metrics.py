"""How far a cached result is from the uncached one: PSNR, SSIM and the Frechet distance, in one place.

The demo, the benchmarks and the tests all measure with these (torch only; no diffusers, no scipy).
Every function computes in float64.

Choosing ``data_range`` (the peak of PSNR, and SSIM's scale) is the caller's decision, made explicit:

- images with a fixed range: its width. ``1.0`` for pixels in [0, 1] (a diffusers pipeline's
  ``output_type="np"``), ``2.0`` for [-1, 1] (what a DDPM works in), ``255.0`` for 8-bit pixels;
- tensors with no fixed range (latents, a U-Net's output): the reference's own spread,
  ``float(ref.max() - ref.min())``, so that a dB figure means the same thing at any scale.

The same pair of tensors gives different dB under different ranges (20 log10 of their ratio), so a
reported PSNR should say which range it used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["frechet_distance", "psnr", "ssim"]


def psnr(ref: torch.Tensor, x: torch.Tensor, data_range: float, *, per_image: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio of ``x`` against ``ref`` in dB: ``10 log10(data_range^2 / MSE)``.

    ``data_range`` is the peak: the width of the values' range (see the module docstring for how to
    choose it). The mean squared error is taken over all elements, a 0-dim tensor; with ``per_image``
    over all but the first dimension, one value per image. Identical inputs give ``inf``.

    Example:
        >>> a = torch.zeros(2, 3, 4, 4)
        >>> psnr(a, a + 0.02, data_range=2.0).round()
        tensor(40.)
        >>> psnr(a, a + 0.02, data_range=1.0, per_image=True).round()
        tensor([34., 34.])
        >>> psnr(a, a, data_range=1.0)
        tensor(inf)
    """
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ValueError(
            f"data_range={data_range!r} is invalid: pass the width of the values' range, a positive number "
            "(1.0 for images in [0, 1], 2.0 for [-1, 1], float(ref.max() - ref.min()) for latents)"
        )
    if ref.shape != x.shape:
        raise ValueError(f"psnr compares tensors of one shape; got {tuple(ref.shape)} and {tuple(x.shape)}")
    err = (ref.detach().double() - x.detach().double()).pow(2)
    mse = err.flatten(1).mean(1) if per_image else err.mean()
    return (10 * torch.log10(data_range**2 / mse)).float()


def ssim(ref: torch.Tensor, x: torch.Tensor, data_range: float) -> torch.Tensor:
    """Structural similarity of each image in ``x`` against ``ref`` (shape ``batch``), averaged over channels.

    Images are ``batch x channels x H x W`` with H, W >= 7. The standard form (Wang et al. 2004): 7x7
    Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, over the valid region. ``data_range`` as for
    :func:`psnr`. Symmetric in its two arguments.

    Example:
        >>> a = torch.rand(2, 3, 16, 16)
        >>> ssim(a, a, data_range=1.0)
        tensor([1., 1.])
    """
    x, ref = x.detach().double(), ref.detach().double()
    k = torch.exp(-((torch.arange(7, dtype=torch.float64) - 3) ** 2) / (2 * 1.5**2))
    k = (k / k.sum()).view(1, 1, 1, 7).to(x.device)
    c = x.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, k.expand(c, 1, 1, 7), groups=c)
        return F.conv2d(t, k.transpose(2, 3).expand(c, 1, 7, 1), groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(ref)
    vx, vy, cov = blur(x * x) - mx * mx, blur(ref * ref) - my * my, blur(x * ref) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples), as in FID.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, with the trace of the matrix square root
    taken from the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric, so ``eigh`` suffices).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(500, 4, generator=g)
        >>> abs(round(frechet_distance(a, a), 6)), round(frechet_distance(a, a + 1), 3)
        (0.0, 4.0)
    """
    a, b = a.detach().double(), b.detach().double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
