"""fxcache.metrics: one PSNR (with an explicit data range), SSIM and the Frechet distance."""

from __future__ import annotations

import math

import pytest
import torch

from fxcache.metrics import frechet_distance, psnr, ssim


def test_psnr_known_values() -> None:
    ref = torch.zeros(2, 3, 8, 8)
    x = ref + 0.01
    assert float(psnr(ref, x, data_range=1.0)) == pytest.approx(40.0, abs=1e-4), "10 log10(1 / 1e-4) = 40 dB"
    assert float(psnr(ref, x, data_range=2.0)) == pytest.approx(40.0 + 20 * math.log10(2), abs=1e-4), (
        "doubling the data range adds 20 log10(2) dB"
    )
    assert math.isinf(float(psnr(ref, ref, data_range=1.0))), "identical tensors: inf"


def test_psnr_per_image_and_whole_batch() -> None:
    ref = torch.zeros(2, 1, 4, 4)
    x = ref.clone()
    x[0] += 0.1  # only the first image differs
    per = psnr(ref, x, data_range=1.0, per_image=True)
    assert per.shape == (2,), "one value per image"
    assert float(per[0]) == pytest.approx(20.0, abs=1e-4) and math.isinf(float(per[1])), per
    whole = psnr(ref, x, data_range=1.0)
    assert whole.dim() == 0 and float(whole) == pytest.approx(20.0 + 10 * math.log10(2), abs=1e-4), (
        "over the whole batch the error is averaged over both images"
    )


def test_psnr_is_symmetric_and_checks_its_arguments() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert torch.equal(psnr(a, b, 2.0), psnr(b, a, 2.0)), "the MSE does not depend on the order"
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, data_range=0.0)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, b[:2], data_range=1.0)


def test_psnr_latents_with_the_references_range() -> None:
    """What the benchmarks do for latents: the peak is the reference's spread (max - min)."""
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert float(psnr(ref, ref + 0.03, data_range=float(ref.max() - ref.min()))) == pytest.approx(40.0, abs=1e-3)


def test_ssim() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=g)
    assert torch.allclose(ssim(a, a, data_range=1.0), torch.ones(2)), "an image against itself: 1"
    noisy = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    s = ssim(a, noisy, data_range=1.0)
    assert s.shape == (2,) and bool(((s > 0) & (s < 0.95)).all()), s
    assert torch.allclose(s, ssim(noisy, a, data_range=1.0)), "SSIM is symmetric"


def test_frechet_distance() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 4, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6, "a set against itself: 0"
    assert frechet_distance(a, a + 1) == pytest.approx(4.0, abs=1e-6), "a shift by 1 in 4 dimensions: |mu|^2 = 4"
    b = torch.randn(2000, 4, generator=g) * 2  # covariance 4 I against I: tr(I + 4I - 2*2I) = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)
