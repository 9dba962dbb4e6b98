"""ControlNet pipelines through ``fxcache.enable`` equal ``DeepCacheSDHelper`` bit for bit (fp32, CPU).

The helper runs the whole ControlNet every step. fxcache does too with ``prune_controlnet=False``; by
default it runs on shallow steps only the part of the ControlNet whose residuals the shallow U-Net reads,
which must not change a single bit of the latents.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fxcache
from tests import models
from tests.test_adapters_diffusers import _reference


def _fxcache(pipe: Any, branch: int, interval: int, **gen: Any) -> tuple[torch.Tensor, tuple[int, int]]:
    unet, net = pipe.unet, pipe.controlnet
    fxcache.enable(pipe, branch=branch, interval=interval)
    try:
        out = models.generate(pipe, **gen)
        st = pipe.unet.fxcache_state
        return out, (st.full_steps, st.shallow_steps)
    finally:
        fxcache.disable(pipe)
        assert pipe.unet is unet and pipe.controlnet is net, "disable puts back the very same modules"
        assert "forward" not in vars(net), "disable leaves the ControlNet as it was"


def _check(pipe: Any, branch: int, interval: int, **gen: Any) -> torch.Tensor:
    ref = _reference(pipe, branch, interval, **gen)
    ours, (full, shallow) = _fxcache(pipe, branch, interval, **gen)
    assert shallow > 0, "some steps must be shallow"
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"
    return ours


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 2), (5, 3)])
def test_img2img_equals_reference_helper(branch: int, interval: int) -> None:
    pipe = models.sd_controlnet_img2img_pipeline()
    _check(pipe, branch, interval, steps=6, strength=0.8, control_image=models.control_image())


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(1, 2), (11, 3)])
def test_inpaint_equals_reference_helper(branch: int, interval: int) -> None:
    pipe = models.sd_controlnet_inpaint_pipeline()
    _check(pipe, branch, interval, steps=6, strength=0.8, control_image=models.control_image())


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 3), (8, 2)])
def test_sdxl_equals_reference_helper(branch: int, interval: int) -> None:
    pipe = models.sdxl_controlnet_pipeline()
    _check(pipe, branch, interval, steps=5, image=models.control_image())


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval", "scale"), [(0, 3, [0.7, 1.3]), (3, 2, 0.5)])
def test_multi_controlnet_equals_reference_helper(branch: int, interval: int, scale: Any) -> None:
    pipe = models.sd_controlnet_pipeline(nets=2)
    images = [models.control_image(), models.control_image(seed=4)]
    _check(pipe, branch, interval, steps=5, image=images, controlnet_conditioning_scale=scale)


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 2), (2, 4)])
def test_guess_mode_equals_reference_helper(branch: int, interval: int) -> None:
    pipe = models.sd_controlnet_pipeline()
    _check(
        pipe,
        branch,
        interval,
        steps=5,
        image=models.control_image(),
        guess_mode=True,
        controlnet_conditioning_scale=0.6,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval", "nets"), [(0, 2, 1), (4, 3, 2)])
def test_guidance_start_end_equals_reference_helper(branch: int, interval: int, nets: int) -> None:
    # The pipeline passes the ControlNet a per-step Python float scale (0.0 outside [start, end]).
    pipe = models.sd_controlnet_pipeline(nets=nets)
    image = models.control_image() if nets == 1 else [models.control_image(), models.control_image(seed=4)]
    _check(pipe, branch, interval, steps=6, image=image, control_guidance_start=0.2, control_guidance_end=0.7)
