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
from fxcache.adapters.controlnet import _lift_scales, installed, residuals_read
from fxcache.adapters.diffusers import swap_unet
from tests import models
from tests.test_adapters_diffusers import _reference


def _fxcache(pipe: Any, branch: int, interval: int, prune: bool = True, **gen: Any) -> tuple[torch.Tensor, dict]:
    unet, net = pipe.unet, pipe.controlnet
    fxcache.enable(pipe, branch=branch, interval=interval, prune_controlnet=prune)
    try:
        out = models.generate(pipe, **gen)
        st, hook = pipe.unet.fxcache_state, installed(pipe.controlnet)
        assert (hook is not None) == prune, "the ControlNet is hooked exactly when pruning is on"
        info = {"full": st.full_steps, "shallow": st.shallow_steps, "hook": hook}
        return out, info
    finally:
        fxcache.disable(pipe)
        assert pipe.unet is unet and pipe.controlnet is net, "disable puts back the very same modules"
        assert "forward" not in vars(net), "disable leaves the ControlNet as it was"


def _check(pipe: Any, branch: int, interval: int, whole: bool = False, **gen: Any) -> torch.Tensor:
    """fxcache (ControlNet pruned on shallow steps) == DeepCacheSDHelper, bit for bit; with ``whole``,
    also == fxcache running the whole ControlNet every step."""
    ref = _reference(pipe, branch, interval, **gen)
    ours, info = _fxcache(pipe, branch, interval, **gen)
    assert info["shallow"] > 0, "some steps must be shallow"
    assert torch.equal(ours, ref), f"max |diff| vs DeepCacheSDHelper: {(ours - ref).abs().max().item()}"
    hook = info["hook"]
    plans = [p for p in hook.plans.values() if p is not None]
    if plans:  # the branch leaves some residual unread: every shallow step ran a pruned ControlNet
        assert (hook.whole_calls, hook.pruned_calls) == (info["full"], info["shallow"]), "pruned on shallow steps"
        assert len(plans) == 1 and plans[0].flops_fraction < 1.0, "one capture serves the whole generation"
    else:  # the deepest branch reads every residual: nothing to prune
        assert (hook.whole_calls, hook.pruned_calls) == (info["full"] + info["shallow"], 0)
    if whole:
        whole_out, _ = _fxcache(pipe, branch, interval, prune=False, **gen)
        assert torch.equal(ours, whole_out), "pruning the ControlNet must not change a bit"
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
    _check(pipe, branch, interval, True, steps=5, image=models.control_image())


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
    gen = {"image": image, "control_guidance_start": 0.2, "control_guidance_end": 0.7}
    _check(pipe, branch, interval, steps=6, **gen)


@pytest.mark.slow
@pytest.mark.parametrize(("branch", "interval"), [(0, 3), (2, 2)])
def test_pruned_txt2img_equals_whole_and_reference(branch: int, interval: int) -> None:
    pipe = models.sd_controlnet_pipeline()
    _check(pipe, branch, interval, True, steps=5, image=models.control_image(), controlnet_conditioning_scale=0.8)


def _unet_plan(branch: int) -> Any:
    unet = models.sd_unet()
    args, kwargs = models.sd_inputs()
    with torch.no_grad():
        down, mid = models.controlnet(unet)(
            args[0], args[1], encoder_hidden_states=kwargs["encoder_hidden_states"],
            controlnet_cond=torch.rand(2, 3, 16, 16), return_dict=False,
        )  # fmt: skip
    kwargs.update(down_block_additional_residuals=list(down), mid_block_additional_residual=mid)
    return fxcache.plan(unet, args, kwargs, branch=branch)


@pytest.mark.parametrize(
    ("branch", "down_read", "mid_read"),
    [(0, 1, False), (1, 2, False), (3, 4, False), (11, 12, True)],
)
def test_shallow_graph_reads_the_residuals_above_the_cut(branch: int, down_read: int, mid_read: bool) -> None:
    p = _unet_plan(branch)
    down, mid = residuals_read(p)
    assert down == (True,) * down_read + (False,) * (12 - down_read), (
        f"branch {branch} reads residuals 0..{down_read - 1}"
    )
    assert mid is mid_read, "only the deepest branch's shallow graph adds the mid-block residual"
    placeholders = [n for n in p.shallow.graph.nodes if n.op == "placeholder"]
    n_leaves = p.signature.spec.num_leaves
    assert len(placeholders) == n_leaves + len(p.feature_specs), "the shallow graph takes every leaf, then the feature"


def _manual_steps(pipe: Any, steps: list[tuple[int, int]]) -> list[Any]:
    """Call ``pipe.controlnet`` then ``pipe.unet`` by hand, as a pipeline does; ``steps``: (timestep index, batch)."""
    g = torch.Generator().manual_seed(0)
    pipe.scheduler.set_timesteps(4)
    outs = []
    for i, batch in steps:
        x = torch.randn(batch, 4, 16, 16, generator=g)
        emb = torch.randn(batch, 7, models.CROSS_DIM, generator=g)
        t = pipe.scheduler.timesteps[i]
        cond = torch.rand(batch, 3, 16, 16, generator=g)
        down, mid = pipe.controlnet(x, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        outs.append(pipe.unet(x, t, encoder_hidden_states=emb, return_dict=False, **kw)[0])
    return outs


def test_controlnet_and_unet_share_one_step_decision() -> None:
    pipe = models.sd_controlnet_pipeline()
    net = pipe.controlnet
    fxcache.enable(pipe, branch=0, interval=2)
    hook = installed(pipe.controlnet)
    assert hook is not None and installed(net) is None, "the pipeline's view is hooked, not the ControlNet"
    _manual_steps(pipe, [(0, 2), (1, 2), (2, 2), (3, 2)])
    st = pipe.unet.fxcache_state
    assert (st.full_steps, st.shallow_steps) == (2, 2), "the step counter advanced once per step, not twice"
    assert (hook.whole_calls, hook.pruned_calls) == (2, 2)
    (plan,) = hook.plans.values()
    assert plan.needed == (0,) and plan.flops_fraction < 0.2, plan
    fxcache.enable(pipe, branch=0, interval=3)
    assert installed(pipe.controlnet) is hook and len(hook.plans) == 1, "re-enabling keeps the hook and its graphs"
    fxcache.disable(pipe)
    assert pipe.controlnet is net and "forward" not in vars(net)


def test_a_signature_change_after_a_pruned_controlnet_raises() -> None:
    pipe = models.sd_controlnet_pipeline()
    fxcache.enable(pipe, branch=0, interval=2)
    with pytest.raises(RuntimeError, match="prune_controlnet=False"):
        # Step 1 is shallow: the ControlNet runs pruned for batch 2, but the U-Net is then called with batch 4.
        g = torch.Generator().manual_seed(0)
        _manual_steps(pipe, [(0, 2)])
        x, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, models.CROSS_DIM, generator=g)
        t = pipe.scheduler.timesteps[1]
        down, mid = pipe.controlnet(
            x, t, encoder_hidden_states=emb, controlnet_cond=torch.rand(2, 3, 16, 16), return_dict=False
        )
        pipe.unet(
            torch.cat([x, x]), t, encoder_hidden_states=torch.cat([emb, emb]),
            down_block_additional_residuals=[torch.cat([d, d]) for d in down],
            mid_block_additional_residual=torch.cat([mid, mid]),
        )  # fmt: skip
    fxcache.disable(pipe)


def test_a_forward_hooked_before_enable_runs_and_stays() -> None:
    pipe = models.sd_controlnet_pipeline()
    net = pipe.controlnet
    calls = []

    def mine(*args: Any, **kwargs: Any) -> Any:  # as accelerate's hooks do: an instance attribute
        calls.append(1)
        return type(net).forward(net, *args, **kwargs)

    net.forward = mine
    fxcache.enable(pipe, branch=0, interval=2)
    _manual_steps(pipe, [(0, 2), (1, 2)])
    assert calls == [1] and installed(pipe.controlnet).pruned_calls == 1, "full steps run the hooked forward"
    with pytest.raises(AttributeError, match="fxcache_net"):
        pipe.controlnet.forward = mine  # would loop through fxcache's own forward
    fxcache.enable(pipe, branch=1, interval=3, prune_controlnet=False)
    assert pipe.controlnet is net, "prune_controlnet=False on an enabled pipeline puts the ControlNet back"
    fxcache.enable(pipe, branch=0, interval=2)
    fxcache.disable(pipe)
    assert pipe.controlnet is net and vars(net)["forward"] is mine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_lifted_scale_multiplies_to_the_same_bits(dtype: torch.dtype) -> None:
    x = torch.randn(2, 8, 5, 5).to(dtype)
    _, kwargs = _lift_scales((x, 3.0), {"conditioning_scale": [0.7, 1.3]})
    assert all(s.dtype == torch.float64 and s.dim() == 0 for s in kwargs["conditioning_scale"])
    for number, tensor in zip([0.7, 1.3], kwargs["conditioning_scale"], strict=True):
        assert torch.equal(x * number, x * tensor), "a 0-dim float64 tensor is how torch wraps a Python float"
        assert (x * tensor).dtype == dtype
    logspace = torch.logspace(-1, 0, 13)
    assert torch.equal(logspace * 0.7, logspace * kwargs["conditioning_scale"][0]), "guess mode's scales"


def test_a_swapped_in_unet_gets_every_residual() -> None:
    # While swap_unet puts another U-Net in the pipeline, the ControlNet must run whole and leave the step alone.
    pipe = models.sd_controlnet_pipeline()
    gen = {"steps": 4, "image": models.control_image()}
    plain = models.generate(pipe, **gen)
    fxcache.enable(pipe, branch=0, interval=2)
    cached = pipe.unet
    with swap_unet(pipe, cached.model):
        swapped = models.generate(pipe, **gen)
    assert torch.equal(swapped, plain), "the plain U-Net, swapped in, must see the whole ControlNet's residuals"
    assert cached.fxcache_state.full_steps == 0 and installed(pipe.controlnet).pruned_calls == 0
    fxcache.disable(pipe)


# -- issue 26: the ControlNet belongs to one enabled pipeline, and is watched -------------------------------


def _twin(pipe: Any) -> Any:
    """A second pipeline built from the first's components: the same U-Net, ControlNet and scheduler objects."""
    twin = type(pipe)(**pipe.components)
    twin.set_progress_bar_config(disable=True)
    return twin


def test_a_plain_pipeline_sharing_the_controlnet_is_left_alone() -> None:
    # Issue 26 item 1: enable() hooked the ControlNet object, so a plain pipeline sharing it got zeroed residuals
    # on the "shallow" steps of the enabled pipeline's U-Net.
    pipe = models.sd_controlnet_pipeline()
    plain = _twin(pipe)
    gen = {"steps": 4, "image": models.control_image()}
    expected = models.generate(plain, **gen)
    fxcache.enable(pipe, branch=0, interval=2)
    try:
        models.generate(pipe, **gen)
        assert torch.equal(models.generate(plain, **gen), expected), "the plain pipeline must run the plain models"
        assert plain.controlnet is pipe.controlnet.fxcache_net and "forward" not in vars(plain.controlnet)
    finally:
        fxcache.disable(pipe)


def test_two_enabled_pipelines_sharing_a_controlnet_keep_their_own_steps() -> None:
    # Issue 26 item 1: the ControlNet served the U-Net of whichever pipeline was enabled last.
    first = models.sd_controlnet_pipeline()
    second = _twin(first)
    gen = {"steps": 4, "image": models.control_image()}
    ref = _reference(first, 0, 2, **gen)
    fxcache.enable(first, branch=0, interval=2)
    fxcache.enable(second, branch=0, interval=3)
    try:
        models.generate(second, **gen)
        assert torch.equal(models.generate(first, **gen), ref), "the first pipeline's ControlNet follows its U-Net"
        hooks = installed(first.controlnet), installed(second.controlnet)
        assert hooks[0] is not hooks[1], "each enabled pipeline has its own ControlNet step"
        assert (hooks[0].pruned_calls, hooks[1].pruned_calls) == (2, 2), "steps 1, 3 and steps 1, 2 pruned"
    finally:
        fxcache.disable(first), fxcache.disable(second)


def test_a_controlnet_replaced_while_enabled_is_not_left_hooked() -> None:
    # Issue 26 item 1: after pipe.controlnet = other, the old ControlNet stayed hooked, even after disable.
    pipe = models.sd_controlnet_pipeline()
    old, other = pipe.controlnet, models.controlnet(pipe.unet, seed=7)
    gen = {"steps": 4, "image": models.control_image()}
    fxcache.enable(pipe, branch=0, interval=2)
    try:
        models.generate(pipe, **gen)
        pipe.controlnet = other  # as a user does: recorded in the pipeline's config
        ours = models.generate(pipe, **gen)
    finally:
        fxcache.disable(pipe)
    assert pipe.controlnet is other and installed(old) is None and "forward" not in vars(old), "old is untouched"
    assert torch.equal(ours, _reference(pipe, 0, 2, **gen)), "the new ControlNet runs whole: the helper's latents"


def test_controlnet_weights_replaced_between_generations_are_seen() -> None:
    # Issue 26 item 2: load_state_dict(assign=True) on the ControlNet left shallow steps on the old weights.
    pipe = models.sd_controlnet_pipeline()
    gen = {"steps": 4, "image": models.control_image()}
    fxcache.enable(pipe, branch=0, interval=2)
    try:
        models.generate(pipe, **gen)  # builds the pruned ControlNet
        state = {k: v * 1.5 for k, v in pipe.controlnet.state_dict().items()}
        pipe.controlnet.load_state_dict(state, assign=True)  # new Parameter objects
        ours = models.generate(pipe, **gen)
        assert installed(pipe.controlnet).pruned_calls == 4, "still pruned on shallow steps, with a new capture"
    finally:
        fxcache.disable(pipe)
    assert torch.equal(ours, _reference(pipe, 0, 2, **gen)), "shallow steps must run the new weights"
