"""Skips transformed on their way to the merge (ControlNet residuals, FreeU, scaled skips): same branches as
without the transform, and whole generations equal to DeepCacheSDHelper's bit for bit."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.capture import capture
from fxcache.passes import find_skip_merges
from fxcache.predicates import module_path
from tests import models
from tests.test_adapters_diffusers import _fxcache, _reference


def _branches(unet, args, kwargs) -> list[tuple[str, str]]:
    return [(module_path(m.source), module_path(m.merge)) for m in find_skip_merges(capture(unet, args, kwargs).gm)]


def test_controlnet_residuals_and_freeu_keep_the_branches() -> None:
    unet = models.sd_unet()
    args, kwargs = models.sd_inputs()
    plain = _branches(unet, args, kwargs)
    assert len(plain) == 12
    with torch.no_grad():
        down, mid = models.controlnet(unet)(
            args[0], args[1], encoder_hidden_states=kwargs["encoder_hidden_states"],
            controlnet_cond=torch.rand(2, 3, 16, 16), return_dict=False,
        )  # fmt: skip
    residuals = dict(kwargs, down_block_additional_residuals=list(down), mid_block_additional_residual=mid)
    assert _branches(unet, args, residuals) == plain, "ControlNet residuals must not change the skips"
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert _branches(unet, args, kwargs) == plain, "FreeU must not change the skips"


class ScaledSkipUNet(torch.nn.Module):
    """NCSN++-style: the skip is scaled (and projected) on its way to an additive merge."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = torch.nn.Conv2d(8, 8, 1)
        self.up = torch.nn.Upsample(scale_factor=2)
        self.head = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) * t.reshape(-1, 1, 1, 1)
        deep = self.up(self.down(h).relu())
        return self.head(deep + self.proj(h) * 2**-0.5)


def test_scaled_and_projected_additive_skip() -> None:
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    (merge,) = find_skip_merges(capture(ScaledSkipUNet(), (x, t), {}).gm)
    assert merge.kind == "add" and module_path(merge.source) == "<top>" and merge.source.name == "mul"
    assert module_path(merge.deep) == "up", "the deep operand comes up from the lower resolution"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("branch", "interval", "backbone"),
    [(0, 3, (1.2, 1.4)), (5, 2, (1.2, 1.4)), (8, 2, (1.0, 1.0)), (11, 3, (1.0, 1.0))],
)
def test_freeu_equals_reference_helper(branch: int, interval: int, backbone: tuple[float, float]) -> None:
    # Branches 6-11 cache a tensor that FreeU then scales in place (b1, b2 != 1): the helper keeps a reference to
    # it, so its cache is scaled again at every step that uses it (see the next test). There fxcache keeps the
    # feature as the full step used it; with b1 = b2 = 1 (Fourier filtering of the skips only) both agree.
    pipe = models.sd_pipeline()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=backbone[0], b2=backbone[1])
    ref = _reference(pipe, branch, interval, steps=6)
    ours, _ = _fxcache(pipe, branch, interval, steps=6)
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"


@pytest.mark.parametrize("branch", [6, 11])
def test_freeu_shallow_step_on_a_fresh_cache_is_exact(branch: int) -> None:
    unet = models.sd_unet()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    args, kwargs = models.sd_inputs()
    cached = fxcache.transform(unet, branch=branch, interval=2)
    with torch.no_grad():
        ref = unet(*args, **kwargs).sample
        full, shallow = (o.sample for o in models.full_then_shallow(cached, *args, **kwargs))
    assert torch.equal(full, ref), "the full step is the model (FreeU's in-place scaling kept)"
    assert torch.equal(shallow, ref), "a shallow step reading the feature just cached equals the full step"


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 3), (4, 2), (11, 5)])
def test_controlnet_equals_reference_helper(branch: int, interval: int) -> None:
    pipe = models.sd_controlnet_pipeline()
    gen = {"steps": 6, "image": models.control_image()}
    ref = _reference(pipe, branch, interval, **gen)
    ours, _ = _fxcache(pipe, branch, interval, **gen)
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"
    assert not torch.equal(ours, models.generate(pipe, **gen)), "caching must change the result"
