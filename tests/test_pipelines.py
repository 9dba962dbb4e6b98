"""Pipeline coverage: whole generations through fxcache.enable equal DeepCacheSDHelper bit for bit,
including schedulers that repeat timesteps and pipelines that start mid-schedule."""

from __future__ import annotations

import pytest
import torch

import fxcache
from tests import models
from tests.test_adapters_diffusers import _fxcache, _reference

pytestmark = pytest.mark.slow


def _check(pipe, branch: int, interval: int, **gen) -> None:
    plain = models.generate(pipe, **gen)
    ref = _reference(pipe, branch, interval, **gen)
    ours, _ = _fxcache(pipe, branch, interval, **gen)
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"
    assert not torch.equal(ours, plain), "caching must change the result"


def test_pndm_repeated_timestep_follows_first_occurrence() -> None:
    # PLMS with skip_prk_steps lists its second timestep twice: 10 steps are 11 UNet calls. Counting
    # calls would disagree with the reference at N=2; the first-occurrence rule agrees.
    pipe = models.sd_pipeline(scheduler=models.pndm())
    _check(pipe, 0, 2, steps=10)


def test_heun_repeated_timesteps() -> None:
    _check(models.sd_pipeline(scheduler=models.heun()), 1, 2, steps=5)


@pytest.mark.parametrize(("branch", "interval"), [(0, 2), (3, 3)])
def test_img2img_starts_mid_schedule(branch: int, interval: int) -> None:
    _check(models.sd_img2img_pipeline(), branch, interval, steps=10)


def test_inpainting_nine_channel_unet() -> None:
    pipe = models.sd_inpaint_pipeline()
    assert pipe.unet.config.in_channels == 9
    _check(pipe, 1, 3, steps=8, strength=1.0)


def test_sdxl_img2img() -> None:
    _check(models.sdxl_img2img_pipeline(), 2, 3, steps=8)


def test_guidance_off_and_many_images() -> None:
    pipe = models.sd_pipeline()
    _check(pipe, 0, 3, steps=6, guidance=1.0)  # batch 1: no classifier-free guidance
    _check(pipe, 1, 2, steps=6, images=3)


def test_nonuniform_schedule_through_enable() -> None:
    pipe = models.sd_pipeline()
    schedule = fxcache.nonuniform(3, center=4, power=1.4)
    fxcache.enable(pipe, branch=0, schedule=schedule)
    try:
        models.generate(pipe, steps=12)
        st = pipe.unet.fxcache_state
        assert st.full_steps == len(schedule.full_steps(12)) == 4, "the pipeline supplies total=12"
    finally:
        fxcache.disable(pipe)


def test_svd_spatio_temporal_unet() -> None:
    unet = models.svd_unet()
    args, kwargs = models.svd_inputs()
    branches = fxcache.explain(unet, *args, **kwargs)
    assert len(branches) == 6 and branches[0].skip_from == "conv_in", str(branches)
    with torch.no_grad():
        ref = unet(*args, **kwargs).sample
        exact = fxcache.transform(unet, branch=0, interval=1)
        assert torch.equal(exact(*args, **kwargs).sample, ref), "interval=1 equals the original"
        cached = fxcache.transform(unet, branch=2, interval=2)
        full, shallow = (o.sample for o in models.full_then_shallow(cached, *args, **kwargs))
    assert torch.equal(full, ref) and torch.equal(shallow, ref), "a shallow step on a fresh cache is exact"
