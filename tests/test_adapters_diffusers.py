"""Whole generations through fxcache.enable equal the paper's reference helper, bit for bit.

In fp32 on CPU both run the same ATen ops in the same order, so the latents must be identical
(``torch.equal``), not merely close.
"""

from __future__ import annotations

import pytest
import torch
from DeepCache import DeepCacheSDHelper

import fxcache
from fxcache.adapters.diffusers import branch_from_deepcache_id, swap_unet
from tests import models


def _reference(pipe, cache_branch_id: int, interval: int, **gen) -> torch.Tensor:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=cache_branch_id)
    helper.enable()
    try:
        return models.generate(pipe, **gen)
    finally:
        helper.disable()


def _fxcache(pipe, branch: int, interval: int, **gen) -> tuple[torch.Tensor, tuple[int, int]]:
    fxcache.enable(pipe, branch=branch, interval=interval)
    try:
        out = models.generate(pipe, **gen)
        st = pipe.unet.fxcache_state
        return out, (st.full_steps, st.shallow_steps)
    finally:
        fxcache.disable(pipe)


@pytest.fixture(scope="module")
def sd_pipe():
    return models.sd_pipeline()


@pytest.fixture(scope="module")
def sd_plain(sd_pipe) -> torch.Tensor:
    return models.generate(sd_pipe)


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 2), (0, 5), (1, 3), (3, 3), (11, 4)])
def test_sd_equals_reference_helper(sd_pipe, sd_plain, branch: int, interval: int) -> None:
    ref = _reference(sd_pipe, branch, interval)
    ours, (full, shallow) = _fxcache(sd_pipe, branch, interval)
    assert (full, shallow) == (-(-10 // interval), 10 - -(-10 // interval)), "uniform 1:N over 10 steps"
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"
    assert not torch.equal(ours, sd_plain), "caching must change the result (else nothing was cached)"


@pytest.mark.slow
def test_sd_euler_two_images_per_prompt() -> None:
    pipe = models.sd_pipeline(scheduler=models.euler())
    ref = _reference(pipe, 2, 3, steps=8, images=2)
    ours, _ = _fxcache(pipe, 2, 3, steps=8, images=2)
    assert ours.shape[0] == 2 and torch.equal(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 3), (4, 2), (8, 5)])
def test_sdxl_equals_reference_helper(branch: int, interval: int) -> None:
    pipe = models.sdxl_pipeline()
    plain = models.generate(pipe, steps=8)
    ref = _reference(pipe, branch, interval, steps=8)
    ours, _ = _fxcache(pipe, branch, interval, steps=8)
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"
    assert not torch.equal(ours, plain)


@pytest.mark.slow
@pytest.mark.parametrize("cache_branch_id", [1, 2, 5])
def test_one_layer_per_block_maps_reference_ids(cache_branch_id: int) -> None:
    # With one layer per down block the reference's id is not the skip index: id 2 is skip 1, id 5 is skip 3.
    pipe = models.sd_pipeline(unet=models.sd_unet(layers_per_block=1))
    branch = branch_from_deepcache_id(pipe.unet, cache_branch_id)
    assert branch == {1: 1, 2: 1, 5: 3}[cache_branch_id]
    ref = _reference(pipe, cache_branch_id, 3, steps=6)
    ours, _ = _fxcache(pipe, branch, 3, steps=6)
    assert torch.equal(ours, ref)


def test_enable_disable_round_trip(sd_pipe) -> None:
    original, config_before = sd_pipe.unet, dict(sd_pipe.config)
    assert fxcache.enable(sd_pipe, branch=0, interval=3) is sd_pipe
    assert isinstance(sd_pipe.unet, fxcache.CachedModule) and sd_pipe.unet.model is original
    assert dict(sd_pipe.config) == config_before, "enable must not rewrite the pipeline's config"
    cached = sd_pipe.unet
    fxcache.enable(sd_pipe, branch=1, interval=2)  # re-enable replaces the settings, on the same module
    assert sd_pipe.unet is cached and cached.model is original
    assert (cached.cache_config.branch, cached.cache_config.interval) == (1, 2)
    fxcache.enable(sd_pipe, branch=1, schedule=fxcache.full_steps([0, 4]))
    assert cached.cache_config.interval is None and cached.cache_config.schedule is not None
    fxcache.disable(sd_pipe)
    assert sd_pipe.unet is original
    fxcache.disable(sd_pipe)  # a no-op when not enabled
    assert sd_pipe.unet is original


@pytest.mark.slow
def test_consecutive_generations_and_resolution_change(sd_pipe, sd_plain) -> None:
    ref = _reference(sd_pipe, 0, 3)
    fxcache.enable(sd_pipe, branch=0, interval=3)
    try:
        first = models.generate(sd_pipe)
        small = models.generate(sd_pipe, size=8)  # a new signature mid-session: new generation, full first step
        second = models.generate(sd_pipe)
    finally:
        fxcache.disable(sd_pipe)
    plain_small = models.generate(sd_pipe, size=8)
    assert torch.equal(first, ref) and torch.equal(second, ref), "each generation starts afresh"
    assert small.shape[-1] == 8 and not torch.equal(small, plain_small)


def test_swap_unet_restores_and_leaves_config_alone(sd_pipe) -> None:
    original, config_before = sd_pipe.unet, dict(sd_pipe.config)
    other = models.sd_unet(seed=1)
    with swap_unet(sd_pipe, other) as pipe:
        assert pipe is sd_pipe and sd_pipe.unet is other
        assert dict(sd_pipe.config) == config_before, "the swap must not rewrite the pipeline's config"
    assert sd_pipe.unet is original
    with pytest.raises(RuntimeError, match="inside"):
        with swap_unet(sd_pipe, other):
            raise RuntimeError("inside")
    assert sd_pipe.unet is original, "restored on an error too"


@pytest.mark.slow
def test_reenable_keeps_the_module_and_counts_per_generation(sd_pipe) -> None:
    fxcache.enable(sd_pipe, branch=0, interval=2)
    try:
        cached = sd_pipe.unet
        models.generate(sd_pipe, steps=6)
        st = cached.fxcache_state
        assert (st.generation_full_steps, st.generation_shallow_steps) == (3, 3)
        fxcache.enable(sd_pipe, branch=0, interval=3)  # only N changes: same module
        assert sd_pipe.unet is cached
        models.generate(sd_pipe, steps=6)
        assert (st.generation_full_steps, st.generation_shallow_steps) == (2, 4), "counts restart per generation"
        assert (st.full_steps, st.shallow_steps) == (5, 7), "the cumulative counts do not"
    finally:
        fxcache.disable(sd_pipe)


# -- issue 26 item 6: steps numbered by timestep, not by call ------------------------------------------------


def _two_calls_per_step(pipe, copy: bool) -> tuple[torch.Tensor, str]:
    """A hand-written loop that calls the U-Net twice per timestep (unconditional, then conditional: batch 1
    each); returns the latents and, while fxcache is enabled, each call's decision (F full, s shallow)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    uncond, cond = torch.randn(1, 7, models.CROSS_DIM, generator=g), torch.randn(1, 7, models.CROSS_DIM, generator=g)
    pipe.scheduler.set_timesteps(6)
    marks = ""
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            t = t.clone() if copy else t  # a copy: no longer an element of scheduler.timesteps
            eps = []
            for emb in (uncond, cond):
                before = getattr(pipe.unet, "fxcache_state", None) and pipe.unet.fxcache_state.full_steps
                eps.append(pipe.unet(latents, t, encoder_hidden_states=emb).sample)
                if before is not None:
                    marks += "F" if pipe.unet.fxcache_state.full_steps > before else "s"
            latents = pipe.scheduler.step(eps[0] + 7.5 * (eps[1] - eps[0]), t, latents).prev_sample
    return latents, marks


@pytest.mark.parametrize("copy", [False, True])
def test_two_calls_at_one_timestep_are_one_step(copy: bool) -> None:
    pipe = models.sd_pipeline(unet=models.sd_unet(blocks=2))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        ref, _ = _two_calls_per_step(pipe, copy)
    finally:
        helper.disable()
    fxcache.enable(pipe, branch=0, interval=3)
    try:
        ours, marks = _two_calls_per_step(pipe, copy)
    finally:
        fxcache.disable(pipe)
    assert marks == "FFssssFFssss", f"two calls per timestep are one step, as in the helper (got {marks})"
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"


def test_a_device_timestep_is_numbered_without_being_read() -> None:
    # Timesteps on a device (here "meta", which cannot be read at all) that are not elements of
    # scheduler.timesteps: calls are counted, and the same tensor object again is the same step.
    from fxcache.adapters.diffusers import _SchedulerSteps

    class Pipe:
        scheduler = type("Scheduler", (), {"timesteps": torch.tensor([900, 600, 600, 300]), "begin_index": None})()

    pipe = Pipe()
    steps = _SchedulerSteps(pipe)
    a, b, c, d = (torch.empty((), device="meta") for _ in range(4))
    got = [tuple(steps.step_of(t)[:2]) for t in (a, a, b, c, c, d)]
    assert got == [(True, 0), (False, 0), (False, 1), (False, 1), (False, 1), (False, 3)], got
    elements = pipe.scheduler.timesteps  # elements are placed by their storage offset, never read
    got = [tuple(steps.step_of(t)[:2]) for t in (elements[0], elements[0].expand(2), 600, elements[2], elements[3])]
    assert got == [(True, 0), (False, 0), (False, 1), (False, 1), (False, 3)], "a lower position: a new generation"
