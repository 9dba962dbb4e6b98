"""Plans and compiled graphs outlive the module that built them: a later module of the same model with the same
settings (enable after disable, a second transform) reuses them, unless the model changed."""

from __future__ import annotations

import torch
from torch import nn

import fxcache
from tests import models


def _call(cached: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cached(x, torch.full((x.shape[0],), 900.0))


def test_a_second_transform_reuses_the_first_ones_plan() -> None:
    model = models.PlainUNet().eval()
    x, _ = models.plain_inputs()
    first = fxcache.transform(model, branch=1, interval=3)
    out = _call(first, x)
    (built,) = first.plans.values()
    second = fxcache.transform(model, branch=1, interval=3)
    assert torch.equal(_call(second, x), out)
    assert next(iter(second.plans.values())) is built, "the same plan: no capture"
    other_branch = fxcache.transform(model, branch=0, interval=3)
    _call(other_branch, x)
    assert next(iter(other_branch.plans.values())) is not built, "another branch is another plan"


def test_a_changed_model_is_captured_again() -> None:
    model = models.PlainUNet().eval()
    x, _ = models.plain_inputs()
    first = fxcache.transform(model, branch=0, interval=3)
    _call(first, x)
    (built,) = first.plans.values()
    model.head.weight = nn.Parameter(model.head.weight.detach() * 2)  # a new parameter object
    second = fxcache.transform(model, branch=0, interval=3)
    out = _call(second, x)
    assert next(iter(second.plans.values())) is not built
    with torch.no_grad():
        assert torch.equal(out, model(x, torch.full((2,), 900.0)))


def test_drop_graphs_drops_them_for_later_modules_too() -> None:
    model = models.PlainUNet().eval()
    x, _ = models.plain_inputs()
    first = fxcache.transform(model, branch=0, interval=3)
    _call(first, x)
    (built,) = first.plans.values()
    first.drop_graphs()  # "the model changed in a way fxcache cannot see"
    second = fxcache.transform(model, branch=0, interval=3)
    _call(second, x)
    assert next(iter(second.plans.values())) is not built


def test_enable_after_disable_reuses_the_unets_plans() -> None:
    pipe = models.sd_pipeline(unet=models.sd_unet(blocks=2))
    fxcache.enable(pipe, branch=0, interval=2)
    before = models.generate(pipe, steps=4)
    plans = dict(pipe.unet.plans)
    fxcache.disable(pipe)
    fxcache.enable(pipe, branch=0, interval=2)
    try:
        after = models.generate(pipe, steps=4)
        assert dict(pipe.unet.plans) == plans and all(pipe.unet.plans[s] is p for s, p in plans.items())
    finally:
        fxcache.disable(pipe)
    assert torch.equal(before, after)
