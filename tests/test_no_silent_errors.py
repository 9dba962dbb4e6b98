"""Issue 12: no silent wrong results. Each case either gives the model's own numbers or raises.

Full steps must equal the model run directly (exact), so every check here is ``torch.equal`` against
the wrapped model called the same way.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import pickle
import warnings

import pytest
import torch
from torch import nn

import fxcache
from tests import models


def _plain() -> nn.Module:
    return models.PlainUNet().eval()


def _t(value: float, batch: int = 2) -> torch.Tensor:
    return torch.full((batch,), value)


# -- 1. model changes after the first call --------------------------------------------------------------


class _Lora(nn.Module):
    """What peft's add_adapter does to a layer: the layer replaced by a wrapper adding a low-rank update."""

    def __init__(self, base: nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Conv2d(base.in_channels, 2, 1, bias=False)
        self.up = nn.Conv2d(2, base.out_channels, 1, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def _replace_submodule(model: nn.Module) -> None:
    model.head = _Lora(model.head)


def _replace_parameter(model: nn.Module) -> None:
    state = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects


def _add_hook(model: nn.Module) -> None:
    model.stem.register_forward_hook(lambda module, inputs, output: output * 2)


def _add_pre_hook(model: nn.Module) -> None:
    model.head.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 0.5,))


@pytest.mark.parametrize("change", [_replace_submodule, _replace_parameter, _add_hook, _add_pre_hook])
def test_model_changes_are_seen_at_the_next_generation(change) -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=3)
    with torch.no_grad():
        cached(x, _t(900.0)), cached(x, _t(800.0))
        change(model)
        out = cached(x, _t(900.0))  # the timestep rose: a new generation, which checks the model
        ref = model(x, _t(900.0))
    assert torch.equal(out, ref), f"after {change.__name__} the next generation must run the changed model"
    assert len(cached.plans) == 1, "captured again: the stale plan is gone"


def test_attention_processor_change_is_seen() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Halved(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):  # type: ignore[no-untyped-def]
            return 0.5 * super().__call__(attn, hidden_states, *args, **kwargs)

    unet = models.sd_unet(blocks=2)
    args, kwargs = models.sd_inputs()
    cached = fxcache.transform(unet, branch=0, interval=2)
    with torch.no_grad():
        cached(*args, **kwargs)
        cached.set_attn_processor(Halved())  # through the wrapper, as pipe.unet.set_attn_processor does
        cached.reset()
        out = cached(*args, **kwargs).sample
        ref = unet(*args, **kwargs).sample
    assert torch.equal(out, ref), "a new attention processor must be captured"


def test_peft_adapter_is_seen() -> None:
    peft = pytest.importorskip("peft")
    unet = models.sd_unet(blocks=2)
    args, kwargs = models.sd_inputs()
    cached = fxcache.transform(unet, branch=0, interval=2)
    with torch.no_grad():
        cached(*args, **kwargs)
        unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
        cached.reset()
        out = cached(*args, **kwargs).sample
        ref = unet(*args, **kwargs).sample
        assert torch.equal(out, ref), "a LoRA adapter added with peft must be captured"
        unet.disable_adapters()  # a switch on the LoRA layers, no module replaced
        cached.reset()
        out = cached(*args, **kwargs).sample
        ref = unet(*args, **kwargs).sample
    assert torch.equal(out, ref), "peft's adapter switches must be seen"


def test_load_lora_weights_through_an_enabled_pipeline() -> None:
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    donor = models.sd_unet(blocks=2)
    donor.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    lora = {f"unet.{k}": v for k, v in get_peft_model_state_dict(donor).items()}
    pipe = models.sd_pipeline(unet=models.sd_unet(blocks=2))
    fxcache.enable(pipe, branch=0, interval=2)
    try:
        before = models.generate(pipe, steps=4)
        pipe.load_lora_weights(lora)
        after = models.generate(pipe, steps=4)
        fresh = fxcache.enable(fxcache.disable(pipe), branch=0, interval=2)  # a new module: captures anew
        assert not torch.equal(after, before), "the LoRA changes the result"
        assert torch.equal(after, models.generate(fresh, steps=4)), "and the enabled pipeline ran with it"
    finally:
        fxcache.disable(pipe)


def test_python_attribute_needs_drop_graphs() -> None:
    # Documented limit: a plain attribute the forward reads is not watched; drop_graphs() says "it changed".
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.scale = _plain(), 1.0

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x, t) * self.scale

    model = Scaled()
    x, t = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2)
    with torch.no_grad():
        cached(x, t)
        model.scale = 3.0
        cached.drop_graphs()
        assert torch.equal(cached(x, t), model(x, t))


def test_unchanged_model_is_not_captured_again() -> None:
    unet = models.sd_unet(blocks=2)
    args, kwargs = models.sd_inputs()
    cached = fxcache.transform(unet, branch=0, interval=2)
    with torch.no_grad():
        cached(args[0], torch.tensor(900), **kwargs)
        (first,) = cached.plans.values()
        for _ in range(3):  # generations: each starts by checking the model
            for t in (900, 800):
                cached(args[0], torch.tensor(t), **kwargs)
        assert list(cached.plans.values()) == [first], "an unchanged model keeps its graphs"
        unet.register_buffer("dummy", torch.zeros(1))  # a new buffer (the forward does not read it)
        cached(args[0], torch.tensor(900), **kwargs)
    assert list(cached.plans.values()) != [first], "a changed model is captured again"


# -- 2. generation boundaries ---------------------------------------------------------------------------


def test_same_timestep_is_the_same_step_not_a_shallow_one() -> None:
    model = _plain()
    cached = fxcache.transform(model, branch=0, interval=2)
    x1, _ = models.plain_inputs()
    x2 = torch.randn_like(x1)
    with torch.no_grad():
        cached(x1, _t(999.0))  # a one-step generation
        second = cached(x2, _t(999.0))  # the next one, at the same timestep (or a retry)
        ref = model(x2, _t(999.0))
    assert torch.equal(second, ref), "a call at the previous call's timestep repeats its (full) decision"
    assert cached.fxcache_state.shallow_steps == 0


def test_timestep_keyword_under_another_name() -> None:
    model = _plain()  # forward(x, t)
    x1, _ = models.plain_inputs()
    x2 = torch.randn_like(x1)
    cached = fxcache.transform(model, branch=0, interval=3)
    with torch.no_grad():
        cached(x1, t=_t(900.0)), cached(x1, t=_t(800.0))
        out = cached(x2, t=_t(900.0))  # a rise, passed as t=
        ref = model(x2, _t(900.0))
    assert torch.equal(out, ref), "t= is read as the timestep: its rise starts a new generation"


def test_timestep_found_by_name_at_another_position() -> None:
    class CondFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _plain()

        def forward(self, x: torch.Tensor, cond: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.net(x + cond, timestep)

    model = CondFirst().eval()
    x, _ = models.plain_inputs()
    cond = torch.zeros_like(x)
    cached = fxcache.transform(model, branch=0, interval=3)
    with torch.no_grad():
        cached(x, cond, _t(900.0)), cached(x, cond, _t(800.0))
        out = cached(x * 2, cond, _t(900.0))
        ref = model(x * 2, cond, _t(900.0))
    assert torch.equal(out, ref), "the third positional argument named timestep is the timestep"


def test_manual_loop_over_one_set_timesteps_starts_each_generation_full() -> None:
    pipe = models.sd_pipeline(unet=models.sd_unet(blocks=2))
    unet = pipe.unet
    args, kwargs = models.sd_inputs()
    pipe.scheduler.set_timesteps(4)
    fxcache.enable(pipe, branch=0, interval=3)
    try:
        with torch.no_grad():
            for _ in range(2):  # two generations over one set_timesteps
                outs = [pipe.unet(args[0], t, **kwargs).sample for t in pipe.scheduler.timesteps]
            ref = unet(args[0], pipe.scheduler.timesteps[0], **kwargs).sample
        st = pipe.unet.fxcache_state
        assert torch.equal(outs[0], ref), "the second generation's first step is full"
        assert (st.full_steps, st.shallow_steps) == (4, 4)
    finally:
        fxcache.disable(pipe)


def test_generation_rule() -> None:
    from fxcache.runtime import generation_rule

    assert generation_rule(None, 5.0) == "new"
    assert generation_rule(5.0, 5.0) == "same"
    assert generation_rule(5.0, 4.0) == "next"
    assert generation_rule(4.0, 5.0) == "new"
    assert generation_rule(4.0, None) == "next"


# -- 3. saving and loading ------------------------------------------------------------------------------


def test_save_pretrained_while_enabled(tmp_path) -> None:
    pipe = models.sd_pipeline(unet=models.sd_unet(blocks=2))
    config_before = dict(pipe.config)
    fxcache.enable(pipe, branch=0, interval=2)
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "unet" / "config.json").exists(), "the real UNet is saved"
    assert pipe.config["unet"] == config_before["unet"], "saving must not rewrite the pipeline's config"
    assert isinstance(pipe.unet, fxcache.CachedModule), "still enabled after saving"
    fxcache.disable(pipe)
    assert pipe.config["unet"] == config_before["unet"] == ("diffusers", "UNet2DConditionModel")
    assert "save_pretrained" not in vars(pipe)
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet")
    pairs = zip(loaded.state_dict().values(), pipe.unet.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs), "the saved weights are the UNet's"


def test_state_dict_round_trip_without_prefix() -> None:
    model = _plain()
    cached = fxcache.transform(model, branch=0, interval=2)
    assert list(cached.state_dict()) == list(model.state_dict()), "the wrapped model's keys, unprefixed"
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    cached.load_state_dict(new)
    assert all(torch.equal(v, new[k]) for k, v in model.state_dict().items()), "strict load writes the model"
    newer = {k: v + 1 for k, v in new.items()}
    result = cached.load_state_dict(newer, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, newer[k]) for k, v in model.state_dict().items()), "strict=False loads them too"
    parent = nn.ModuleDict({"unet": cached})
    assert list(parent.state_dict()) == [f"unet.{k}" for k in model.state_dict()]
    parent.load_state_dict({f"unet.{k}": v for k, v in new.items()})
    assert all(torch.equal(v, new[k]) for k, v in model.state_dict().items()), "nested loads too"


# -- 4. mutations inside forward ------------------------------------------------------------------------


class _Counter(models.PlainUNet):
    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            self.n.add_(1)
        else:
            self.n += 1
        return super().forward(x, t)


@pytest.mark.parametrize("in_place", [False, True])
def test_buffer_updated_in_forward_is_refused(in_place: bool) -> None:
    model = _Counter(in_place).eval()
    x, t = models.plain_inputs()
    with pytest.raises(fxcache.CaptureError, match="mutates state"):
        fxcache.transform(model)(x, t)
    assert model.n.item() == 0, "nothing ran half-way"


def test_batchnorm_in_training_mode_is_refused() -> None:
    class WithBN(models.PlainUNet):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return super().forward(self.bn(x), t)

    model = WithBN().train()
    x, t = models.plain_inputs()
    with pytest.raises(fxcache.CaptureError, match=r"BatchNorm running statistics .* model\.eval\(\)"):
        fxcache.transform(model)(x, t)
    assert torch.equal(model.bn.running_mean, torch.zeros(3))


# -- 5. grad modes --------------------------------------------------------------------------------------

_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": contextlib.nullcontext}


@pytest.mark.parametrize("order", list(itertools.permutations(_MODES)), ids="-".join)
def test_generations_under_any_grad_mode_order(order: tuple[str, ...]) -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2)
    for mode in order:
        with _MODES[mode]():
            outs = [cached(x, _t(t)) for t in (900.0, 800.0, 700.0)]
        with torch.no_grad():
            assert torch.equal(outs[2], model(x, _t(700.0))), f"a full step under {mode} is exact"
    cached.reset()
    assert torch.equal(cached(x, _t(900.0)), model(x, _t(900.0)))


# -- 6. aliasing ----------------------------------------------------------------------------------------


class _ReturnsDeep(nn.Module):
    """Returns the deep feature (the tensor fxcache caches) beside its output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(x)
        deep = nn.functional.interpolate(self.down(h), scale_factor=2.0) * t.reshape(-1, 1, 1, 1)
        return self.head(torch.cat([deep, h], dim=1)), deep


def test_output_never_aliases_the_cache() -> None:
    model = _ReturnsDeep().eval()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2)
    with torch.no_grad():
        cached(x, _t(3.0))
        _, deep = cached(x, _t(2.0))  # shallow: its deep output is the cached feature
        kept = deep.clone()
        cached(x, _t(1.0))  # full: rewrites the cache
    assert torch.equal(deep, kept), "a returned tensor must not change under the caller"
    (slot,) = cached.slots.values()
    assert all(deep.untyped_storage().data_ptr() != f.untyped_storage().data_ptr() for f in slot.contents())


# -- 7. schedules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [float("inf"), float("nan")])
def test_nonuniform_power_must_be_finite(power: float) -> None:
    with pytest.raises(ValueError, match="needs power > 1, and a finite one"):
        fxcache.nonuniform(3, power=power)


def test_callable_schedule_must_answer_a_bool() -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, schedule=lambda step, total: "no")
    cached(x, _t(900.0))
    with pytest.raises(TypeError, match="must return True .* or False"):
        cached(x, _t(800.0))


def test_callable_schedule_must_take_step_and_total() -> None:
    with pytest.raises(TypeError, match=r"fn\(step, total\)"):
        fxcache.transform(_plain(), schedule=lambda step: True)


def test_schedule_factory_not_called() -> None:
    with pytest.raises(TypeError, match=r"call it, for example schedule=fxcache.uniform\(3\)"):
        fxcache.transform(_plain(), schedule=fxcache.uniform)  # type: ignore[arg-type]


def test_generation_longer_than_the_schedule_warns_once() -> None:
    model = _plain()
    x, _ = models.plain_inputs(batch=1, size=8)
    cached = fxcache.transform(model, branch=0, schedule=fxcache.nonuniform(3, center=3), total_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(30):
            cached(x, _t(1000.0 - i, batch=1))
    overrun = [w for w in caught if "was sized for 10 steps" in str(w.message)]
    assert len(overrun) == 1, [str(w.message) for w in caught]


def test_real_eq7_with_center_beyond_the_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="center=15 is beyond this generation's 10 steps"):
        fxcache.nonuniform(3, center=15, reference=False).full_steps(10)
    cached = fxcache.transform(_plain(), schedule=fxcache.nonuniform(3, center=15, reference=False), total_steps=10)
    x, t = models.plain_inputs()
    with pytest.raises(ValueError, match="beyond this generation"):
        cached(x, t)  # refused at the generation's first step, not at step 1


# -- 8. smaller cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_a_used_module(how: str) -> None:
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=2)
    cached(x, _t(900.0)), cached(x, _t(800.0))
    twin = copy.deepcopy(cached) if how == "deepcopy" else pickle.loads(pickle.dumps(cached))
    assert twin.model is not model and len(twin.plans) == 0, "a copy starts unused"
    with torch.no_grad():
        assert torch.equal(twin(x, _t(900.0)), model(x, _t(900.0)))
        assert torch.equal(cached(x, _t(700.0)), model(x, _t(700.0))), "the original goes on as before"


def test_missing_argument_is_the_callers_error() -> None:
    x, _ = models.plain_inputs()
    with pytest.raises(TypeError, match="PlainUNet.forward cannot take this call: missing a required argument: 't'"):
        fxcache.transform(_plain())(x)


def test_model_input_error_is_the_models_own() -> None:
    unet = models.sd_unet(blocks=2)
    args, kwargs = models.sd_inputs(batch=0)
    with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements") as info:
        with torch.no_grad():
            fxcache.transform(unet)(*args, **kwargs)
    assert not isinstance(info.value, fxcache.CaptureError)


def test_transform_of_a_transformed_module() -> None:
    cached = fxcache.transform(_plain())
    with pytest.raises(TypeError, match=r"already transformed .* cached.configure"):
        fxcache.transform(cached)


def test_a_capture_under_autocast_does_not_serve_calls_outside_it() -> None:
    # Issue 26 item 7: the autocast state is part of the input signature (a graph captured under autocast holds
    # its casts; outside autocast it raised a dtype error on every later call).
    model = _plain()
    x, _ = models.plain_inputs()
    cached = fxcache.transform(model, branch=0, interval=1)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = cached(x, _t(900.0)), model(x, _t(900.0))
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref), "under autocast: as eager under autocast"
        out, ref = cached(x, _t(800.0)), model(x, _t(800.0))
    assert out.dtype == torch.float32 and torch.equal(out, ref), "outside autocast: as eager outside it"
    assert sorted(s.autocast for s in cached.plans) == [(), (("cpu", torch.bfloat16),)], "one capture each"
