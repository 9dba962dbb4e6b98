from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.capture import capture, flatten_call
from tests import models


def test_graph_reproduces_model_exactly() -> None:
    model = models.PlainUNet("cat").eval()
    x, t = models.plain_inputs()
    cap = capture(model, (x, t), {})
    leaves, _ = flatten_call(model, (x, t), {})
    assert torch.equal(cap.unflatten(cap.gm(*leaves)), model(x, t)), "captured graph must equal eager bit for bit"


def test_weights_are_shared_not_copied() -> None:
    model = models.PlainUNet("cat").eval()
    cap = capture(model, models.plain_inputs(), {})
    params = {id(p) for p in model.parameters()}
    for name in cap.attr_fqns:
        assert id(getattr(cap.gm, name)) in params, f"{name} is a copy, not the model's own tensor"


def test_non_tensor_arguments_keep_their_place() -> None:
    # return_dict=False and None arguments are leaves of the call too; dropping them would shift
    # every later input.
    unet = models.sd_unet()
    args, kwargs = models.sd_inputs()
    kwargs.update(timestep_cond=None, return_dict=False, cross_attention_kwargs=None)
    cap = capture(unet, args, kwargs)
    leaves, _ = flatten_call(unet, args, kwargs)
    with torch.no_grad():
        expected = unet(*args, **kwargs)
        got = cap.unflatten(cap.gm(*leaves))
    assert isinstance(got, tuple), "return_dict=False must give a tuple, as diffusers does"
    assert torch.equal(got[0], expected[0])


def test_keyword_order_does_not_change_the_signature() -> None:
    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()
    _, a = flatten_call(model, (), {"x": x, "t": t})
    _, b = flatten_call(model, (), {"t": t, "x": x})
    assert a == b


def test_capture_error_says_why_and_chains_the_cause() -> None:
    model = models.DataDependent().eval()
    x, t = models.plain_inputs()
    before = model(x, t)
    with pytest.raises(fxcache.CaptureError, match="could not capture DataDependent as one graph") as info:
        capture(model, (x, t), {})
    assert info.value.__cause__ is not None, "the original exception must be chained"
    assert "control flow" in str(info.value), "the message should say what usually causes this"
    assert torch.equal(model(x, t), before), "the model must work as before after a failed capture"
