"""Every bad input gets an error that says what was wrong and what to do; nothing is half-applied."""

from __future__ import annotations

import pytest
import torch

import fxcache
from tests import models


@pytest.mark.parametrize("interval", [0, -3])
def test_interval_below_one(interval: int) -> None:
    with pytest.raises(ValueError, match=rf"interval={interval} is invalid: it must be >= 1"):
        fxcache.transform(models.PlainUNet(), branch=0, interval=interval)


def test_negative_branch() -> None:
    with pytest.raises(ValueError, match=r"branch=-1 is out of range"):
        fxcache.transform(models.PlainUNet(), branch=-1)


@pytest.mark.parametrize("bad", [1.5, "0", True])
def test_wrong_types(bad: object) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        fxcache.transform(models.PlainUNet(), branch=bad)  # type: ignore[arg-type]


def test_branch_out_of_range_names_value_and_range() -> None:
    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()
    before = model(x, t)
    cached = fxcache.transform(model, branch=14)
    with pytest.raises(ValueError, match=r"branch=14 is out of range: this model has 3 skip connections \(0\.\.2\)"):
        cached(x, t)
    assert torch.equal(model(x, t), before), "the model works as before"


def test_no_skip_connection() -> None:
    model = models.NoSkipNet().eval()
    x, t = models.plain_inputs()
    before = model(x, t)
    with pytest.raises(ValueError, match="no skip connection was found in NoSkipNet"):
        fxcache.transform(model)(x, t)
    assert torch.equal(model(x, t), before)


def test_uncapturable_model() -> None:
    model = models.DataDependent().eval()
    x, t = models.plain_inputs()
    before = model(x, t)
    with pytest.raises(fxcache.CaptureError) as info:
        fxcache.transform(model)(x, t)
    assert isinstance(info.value.__cause__, Exception)
    assert torch.equal(model(x, t), before)
    with pytest.raises(fxcache.CaptureError):
        fxcache.explain(model, x, t)


def test_enable_on_something_without_unet() -> None:
    class NotAPipeline:
        unet = None

    with pytest.raises(ValueError, match="has no .unet module"):
        fxcache.enable(NotAPipeline())


def test_pipeline_is_restored_after_a_failed_first_call() -> None:
    pipe = models.sd_pipeline()
    original = pipe.unet
    baseline = models.generate(pipe, steps=3)
    fxcache.enable(pipe, branch=12, interval=2)  # this UNet has 12 skips: 0..11
    with pytest.raises(ValueError, match=r"branch=12 is out of range: this model has 12 skip connections \(0\.\.11\)"):
        models.generate(pipe, steps=3)
    assert pipe.unet is original, "a failed first call must put the original UNet back"
    assert torch.equal(models.generate(pipe, steps=3), baseline), "and the pipeline works exactly as before"


def test_errors_at_enable_leave_pipeline_untouched() -> None:
    pipe = models.sd_pipeline()
    original = pipe.unet
    with pytest.raises(ValueError):
        fxcache.enable(pipe, branch=0, interval=0)
    assert pipe.unet is original


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    raise RuntimeError("this backend cannot compile anything")


def test_pipeline_is_restored_when_compiling_fails() -> None:
    pipe = models.sd_pipeline()
    original = pipe.unet
    baseline = models.generate(pipe, steps=3)
    fxcache.enable(pipe, branch=0, interval=2, compile={"backend": _failing_backend})
    with pytest.raises(Exception, match="this backend cannot compile anything") as info:
        models.generate(pipe, steps=3)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "the full graph failed at its first call" in notes and "compile=False" in notes
    assert "original UNet was put back" in notes
    assert pipe.unet is original, "a compile error at the first call must put the original UNet back"
    assert torch.equal(models.generate(pipe, steps=3), baseline), "and the pipeline works exactly as before"


def test_module_drops_graphs_that_failed_to_compile() -> None:
    model = models.PlainUNet()
    x, t = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2, compile={"backend": _failing_backend})
    with pytest.raises(Exception, match="this backend cannot compile anything"):
        cached(x, t)
    assert len(cached.plans) == 0, "no half-built plan is kept"
    assert cached.fxcache_state.step == -1, "and the next call starts a new generation"
