from __future__ import annotations

import warnings

import pytest
import torch

import fxcache
from tests import models


def _plain(merge: str = "cat") -> torch.nn.Module:
    return models.PlainUNet(merge).eval()


def _run(cached: torch.nn.Module, x: torch.Tensor, timesteps: list[float]) -> list[torch.Tensor]:
    return [cached(x, torch.full((x.shape[0],), t)) for t in timesteps]


@pytest.mark.parametrize("merge", ["cat", "add"])
def test_interval_one_is_the_original(merge: str) -> None:
    model = _plain(merge)
    x, _ = models.plain_inputs()
    ts = [900.0, 700.0, 500.0, 300.0]
    outs = _run(fxcache.transform(model, branch=0, interval=1), x, ts)
    for t, out in zip(ts, outs, strict=True):
        assert torch.equal(out, model(x, torch.full((2,), t))), f"interval=1 must be exact at t={t}"


@pytest.mark.parametrize("merge", ["cat", "add"])
@pytest.mark.parametrize("branch", [0, 1, 2])
def test_shallow_step_on_fresh_cache_is_exact(merge: str, branch: int) -> None:
    model = _plain(merge)
    x, t = models.plain_inputs()
    cached = fxcache.transform(model, branch=branch, interval=2)
    full, shallow = models.full_then_shallow(cached, x, t)
    assert cached.fxcache_state.shallow_steps == 1
    assert torch.equal(full, model(x, t))
    assert torch.equal(shallow, full), "a shallow step fed the cache from the same inputs must equal the full step"


def test_uniform_schedule_and_stale_cache() -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=3)
    ts = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0]
    outs = _run(cached, x, ts)
    st = cached.fxcache_state
    assert (st.full_steps, st.shallow_steps) == (3, 4), "steps 0, 3, 6 full"
    for i, (t, out) in enumerate(zip(ts, outs, strict=True)):
        exact = torch.equal(out, model(x, torch.full((2,), t)))
        assert exact == (i % 3 == 0), f"step {i}: full steps are exact, cached steps differ"


def test_new_generation_rules() -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=10)
    st = cached.fxcache_state
    _run(cached, x, [900.0, 800.0])
    assert (st.full_steps, st.step) == (1, 1)
    _run(cached, x, [900.0])  # timestep rises: new generation
    assert (st.full_steps, st.step) == (2, 0)
    cached.reset()
    _run(cached, x, [100.0])  # after reset
    assert (st.full_steps, st.step) == (3, 0)
    _run(cached, models.plain_inputs(batch=1)[0], [50.0])  # new shape: new capture, first step full
    assert (st.full_steps, st.step) == (4, 0)
    _run(cached, x, [30.0])  # back to the first signature: its cache is gone, so full
    assert (st.full_steps, st.step) == (5, 0)


def test_model_is_not_modified_and_weights_are_shared() -> None:
    model = _plain()
    x, t = models.plain_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cached = fxcache.transform(model, branch=0, interval=1)
    cached(x, t)
    assert type(model).forward is models.PlainUNet.forward and "forward" not in vars(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.head.weight.mul_(2.0)  # an in-place update, as a LoRA fuse does
    assert torch.equal(cached(x, t), model(x, t)), "in-place weight updates must show in the next call"


def test_behaves_like_the_wrapped_model() -> None:
    unet = models.sd_unet()
    cached = fxcache.transform(unet, branch=0, interval=2)
    assert cached.config is unet.config and cached.config.in_channels == 4
    assert cached.dtype == torch.float32 and cached.device == torch.device("cpu")
    assert cached.conv_in is unet.conv_in
    assert cached.eval() is cached and not unet.training
    args, kwargs = models.sd_inputs()
    with torch.no_grad():
        out = cached(*args, **kwargs, return_dict=False)
        ref = unet(*args, **kwargs, return_dict=False)
        out2 = cached(*args, **kwargs)
    assert isinstance(out, tuple) and torch.equal(out[0], ref[0])
    assert type(out2).__name__ == "UNet2DConditionOutput" and torch.equal(out2.sample, ref[0])


def test_to_moves_model_and_recaptures() -> None:
    model = _plain()
    x, t = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2)
    cached(x, t)
    assert cached.to(torch.float64) is cached
    assert model.head.weight.dtype == torch.float64, ".to() applies to the wrapped model"
    out = cached(x.double(), t.double())
    assert out.dtype == torch.float64 and torch.equal(out, model(x.double(), t.double()))
    assert cached.fxcache_state.full_steps == 2, "a new dtype starts a new generation"


def test_nested_arguments_sdxl() -> None:
    unet = models.sdxl_unet()
    args, kwargs = models.sdxl_inputs()
    cached = fxcache.transform(unet, branch=2, interval=2)
    with torch.no_grad():
        a, b = (o.sample for o in models.full_then_shallow(cached, *args, **kwargs))
        ref = unet(*args, **kwargs).sample
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_unet2d_model_family() -> None:
    unet = models.unet2d()
    x = torch.randn(2, 3, 16, 16)
    cached = fxcache.transform(unet, branch=1, interval=3)
    with torch.no_grad():
        outs = [cached(x, torch.tensor(t)).sample for t in (900, 800, 700, 600)]
        refs = [unet(x, torch.tensor(t)).sample for t in (900, 800, 700, 600)]
    assert torch.equal(outs[0], refs[0]) and torch.equal(outs[3], refs[3]), "full steps exact"
    assert not torch.equal(outs[1], refs[1]), "cached steps reuse a stale feature"


def test_changing_python_number_warns_about_recapture() -> None:
    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
            return self.net(x, t) * scale

    cached = fxcache.transform(Scaled(), branch=0, interval=2)
    cached(x, t, 1.0)
    with pytest.warns(UserWarning, match="pass values that change between calls, such as the timestep, as tensors"):
        out = cached(x, t, 2.0)
    assert torch.equal(out, model(x, t) * 2.0), "a new signature starts with a full step"
    assert len(cached.plans) == 2, "a number other than the timestep stays a constant: one capture per value"


class _ScalarT(torch.nn.Module):
    """Takes its timestep as a Python number and builds the tensor itself."""

    def __init__(self, net: torch.nn.Module, branchy: bool = False) -> None:
        super().__init__()
        self.net, self.branchy = net, branchy

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        if self.branchy and t > 850:  # Python control flow on the number: cannot take a tensor
            x = x * 2
        return self.net(x, torch.full((x.shape[0],), t, dtype=x.dtype))


def test_number_timestep_is_lifted_to_a_tensor_input() -> None:
    model = _ScalarT(models.PlainUNet().eval())
    x, _ = models.plain_inputs()
    ts = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recapture warning
        cached = fxcache.transform(model, branch=0, interval=3)
        outs = [cached(x, t) for t in ts]
    assert len(cached.plans) == 1, "one capture serves every step"
    (p,) = cached.plans.values()
    assert [d[1] for d in p.signature.leaves if d[0] == "tensor"] == [(2, 3, 16, 16), ()], "t is a 0-d tensor input"
    ref = fxcache.transform(model, branch=0, interval=3)
    for t, out in zip(ts, outs, strict=True):
        assert torch.equal(out, ref(x, torch.tensor(t))), f"t={t}: an int timestep equals torch.tensor(t)"
    assert torch.equal(outs[0], model(x, 900)) and torch.equal(outs[3], model(x, 600)), "full steps are exact"


def test_number_timestep_the_model_branches_on_stays_a_constant() -> None:
    model = _ScalarT(models.PlainUNet().eval(), branchy=True)
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2)
    assert torch.equal(cached(x, 900.0), model(x, 900.0)), "a model that needs a number still works"
    with pytest.warns(UserWarning, match="Python number argument changed"):
        cached(x, 800.0)
    assert len(cached.plans) == 2, "one capture per value, as without lifting"


def test_step_source_drives_the_schedule() -> None:
    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2)
    steps = iter([(True, 0), (False, 1), (False, 2, 10), (False, 3)])
    cached.step_source = lambda: next(steps)
    for _ in range(4):
        cached(x, t)
    assert (cached.fxcache_state.full_steps, cached.fxcache_state.shallow_steps) == (2, 2)
    cached.step_source = lambda: "step 3"
    with pytest.raises(TypeError, match="step_source must return"):
        cached(x, t)


def test_configure_changes_only_the_given_settings() -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=3)
    assert cached.configure(interval=2) is cached
    assert (cached.cache_config.branch, cached.cache_config.interval) == (0, 2)
    cached.configure(schedule=fxcache.full_steps([0, 3]))
    assert cached.cache_config.interval is None, "interval and schedule are one setting: giving one clears the other"
    with pytest.raises(ValueError, match="branch=-1 is out of range"):
        cached.configure(branch=-1)
    with pytest.raises(ValueError, match="needs the number of denoising steps"):
        cached.configure(schedule=fxcache.nonuniform(3, center=2))
    assert cached.cache_config.branch == 0 and cached.cache_config.interval is None, "a refused change changes nothing"
    with pytest.raises(AttributeError):
        cached.cache_config = fxcache.CacheConfig()  # type: ignore[misc]
    cached.configure(interval=2)
    outs = _run(cached, x, [900.0, 800.0])
    cached.configure(branch=2)  # another cut: a new generation, starting with a full step
    outs += _run(cached, x, [700.0, 600.0])
    assert torch.equal(outs[2], model(x, torch.full((2,), 700.0))), "the first step after a branch change is full"
    st = cached.fxcache_state
    assert (st.full_steps, st.shallow_steps) == (2, 2)
    assert (st.generation_full_steps, st.generation_shallow_steps) == (1, 1)


def test_int_timesteps_through_a_diffusers_unet_capture_once() -> None:
    unet = models.sd_unet()
    (sample, _), kw = models.sd_inputs()
    ts = list(range(900, -1, -100))  # 10 steps, Python ints
    cached = fxcache.transform(unet, branch=1, interval=3)
    ref = fxcache.transform(unet, branch=1, interval=3)
    with torch.no_grad():
        outs = [cached(sample, timestep=t, **kw).sample for t in ts]  # the keyword form is lifted too
        refs = [ref(sample, torch.tensor(t), **kw).sample for t in ts]
        plain = unet(sample, ts[0], **kw).sample
    assert len(cached.plans) == 1, f"one capture for 10 int timesteps, got {len(cached.plans)}"
    assert all(torch.equal(a, b) for a, b in zip(outs, refs, strict=True)), "int timesteps equal torch.tensor(t)"
    assert torch.equal(outs[0], plain), "and the first (full) step equals the UNet called with the int"
    st = cached.fxcache_state
    assert (st.generation_full_steps, st.generation_shallow_steps) == (4, 6)


def test_plans_are_kept_per_branch_and_survive_schedule_changes() -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=3)
    view = cached.plans
    assert len(view) == 0
    _run(cached, x, [900.0, 800.0])
    (first,) = cached.plans.values()
    assert len(view) == 1, "plans is a live view"
    with pytest.raises(TypeError):
        view[first.signature] = first  # type: ignore[index]
    cached.configure(interval=2)
    _run(cached, x, [700.0])
    assert list(cached.plans.values()) == [first], "a schedule change keeps the graphs"
    cached.configure(branch=1)
    assert len(cached.plans) == 0, "another branch has its own plans"
    _run(cached, x, [600.0])
    (second,) = cached.plans.values()
    assert second.branch == 1 and second is not first
    cached.configure(branch=0)
    _run(cached, x, [500.0])
    assert list(cached.plans.values()) == [first], "going back reuses the earlier plan"
    cached.drop_graphs()
    assert len(view) == 0
