from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.schedule import as_schedule
from tests import models

REFERENCE_50_5 = [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]  # the paper's reference pipeline (complex arithmetic)
LITERAL_50_5 = [0, 6, 11, 14, 15, 19, 24, 29, 35, 42]  # Eq. 7 in real arithmetic


def test_uniform() -> None:
    assert fxcache.uniform(3).full_steps(10) == [0, 3, 6, 9]
    assert fxcache.uniform(1).full_steps(4) == [0, 1, 2, 3]


def test_nonuniform_reproduces_the_reference() -> None:
    assert fxcache.nonuniform(5, center=15, power=1.4).full_steps(50) == REFERENCE_50_5


def test_nonuniform_literal_equation() -> None:
    assert fxcache.nonuniform(5, center=15, power=1.4, reference=False).full_steps(50) == LITERAL_50_5


@pytest.mark.parametrize("total", [10, 20, 25, 50, 100])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_nonuniform_has_as_many_full_steps_as_uniform(total: int, interval: int) -> None:
    for reference in (True, False):
        steps = fxcache.nonuniform(interval, center=min(15, total // 3), reference=reference).full_steps(total)
        assert len(steps) == len(fxcache.uniform(interval).full_steps(total)), (total, interval, reference)
        assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] < total


def test_nonuniform_errors() -> None:
    with pytest.raises(ValueError, match="power=1.0 is invalid: Eq. 7 needs power > 1"):
        fxcache.nonuniform(5, power=1.0)
    with pytest.raises(ValueError, match="no power in"):
        fxcache.nonuniform(2, center=25, power=1.4).full_steps(50)
    with pytest.raises(ValueError, match="needs the number of denoising steps"):
        fxcache.transform(models.PlainUNet(), schedule=fxcache.nonuniform(5))


def test_explicit_and_callable_schedules() -> None:
    assert fxcache.full_steps([0, 1, 2, 4, 8, 16, 32]).full_steps(40) == [0, 1, 2, 4, 8, 16, 32]
    assert fxcache.full_steps([5]).full_steps(8) == [0, 5], "step 0 is always full"
    fn = as_schedule(lambda step, total: step < 5 or step % 4 == 0)
    assert fn.full_steps(13) == [0, 1, 2, 3, 4, 8, 12]
    with pytest.raises(TypeError, match="schedule must be"):
        fxcache.transform(models.PlainUNet(), schedule=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give either interval=3 or schedule="):
        fxcache.transform(models.PlainUNet(), interval=3, schedule=fxcache.uniform(3))


def test_transform_follows_an_explicit_schedule() -> None:
    model = models.PlainUNet().eval()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, schedule=fxcache.full_steps([0, 1, 4]))
    ts = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0]
    outs = [cached(x, torch.full((2,), t)) for t in ts]
    full = [torch.equal(o, model(x, torch.full((2,), t))) for o, t in zip(outs, ts, strict=True)]
    assert full == [True, True, False, False, True, False]


def test_transform_with_total_steps() -> None:
    model = models.PlainUNet().eval()
    x, _ = models.plain_inputs()
    schedule = fxcache.nonuniform(5, center=3, power=1.4)
    cached = fxcache.transform(model, branch=0, schedule=schedule, total_steps=12)
    for t in range(12):
        cached(x, torch.full((2,), 1000.0 - t))
    assert cached.fxcache_state.full_steps == len(schedule.full_steps(12)) == 3
