"""fxcache.plan: the build step as a value; the runtime and explain read the same plans."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.backends import eager
from fxcache.capture import capture
from fxcache.passes import count_flops, find_skip_merges, split_at_branch
from fxcache.passes.bind_cache_buffer import CACHE_BUFFER
from tests import models


def _targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("merge", ["cat", "add"])
def test_plan_holds_what_one_signature_needs(merge: str) -> None:
    model = models.PlainUNet(merge).eval()
    x, t = models.plain_inputs()
    p = fxcache.plan(model, (x, t), branch=1)
    assert isinstance(p, fxcache.CachePlan) and (p.branch, p.num_branches) == (1, 3)
    assert p.feature_specs == (fxcache.CacheSpec((2, 8, 8, 8), torch.float32, torch.device("cpu")),)
    assert p.cache_spec == p.feature_specs[0] and p.kind == ("concat" if merge == "cat" else "add")
    assert (p.skip_from, p.merge_into) == ("down1.1", "up1"), "names as explain shows them"
    for g in (p.full, p.shallow):
        assert not any(n.op == "get_attr" and n.target == CACHE_BUFFER for n in g.graph.nodes), "no bound buffer"
        assert "aten.copy_.default" not in _targets(g), "the feature is an output and an input, not written in place"
    n_inputs = [sum(n.op == "placeholder" for n in g.graph.nodes) for g in (p.full, p.shallow)]
    assert n_inputs == [2, 3], f"full takes the call's leaves, shallow the leaves and the feature; got {n_inputs}"
    leaves = p.flatten((x, t))
    *outputs, feature = p.full(*leaves)
    full = p.unflatten(outputs)
    assert feature.shape == p.cache_shape and feature.dtype == torch.float32
    assert torch.equal(full, model(x, t)), "the full graph equals the model"
    assert torch.equal(p.unflatten(p.shallow(*leaves, feature)), full), "the shallow graph on a fresh feature is exact"
    graphs = eager(p)
    assert torch.equal(p.unflatten(graphs.full(*leaves)), full)
    assert torch.equal(graphs.slot.contents()[0], feature), "the eager backend keeps the feature the full graph returned"
    assert torch.equal(p.unflatten(graphs.shallow(*leaves)), full) and not graphs.cudagraphs
    assert "branch=1 of 3" in repr(p)


def test_flops_fraction_is_the_shallow_graphs_share() -> None:
    model = models.PlainUNet("cat").eval()
    x, t = models.plain_inputs()
    gm = capture(model, (x, t), {}).gm
    merges = find_skip_merges(gm)
    for branch in range(3):
        p = fxcache.plan(model, (x, t), branch=branch)
        _, shallow = split_at_branch(gm, merges[branch])  # counted independently, on the unbound split
        expected = count_flops(shallow) / count_flops(gm)
        assert p.flops_fraction == pytest.approx(expected, rel=1e-12), f"branch {branch}"
        assert 0 < p.flops_fraction < 1


def test_explain_reads_the_plans() -> None:
    unet = models.sd_unet()
    args, kwargs = models.sd_inputs()
    table = fxcache.explain(unet, *args, **kwargs)
    for branch in (0, 5, 11):
        p = fxcache.plan(unet, args, kwargs, branch=branch)
        row = table[branch]
        assert row.flops_fraction == p.flops_fraction, f"branch {branch}: explain and the plan must agree"
        assert (row.skip_from, row.merge_into, row.kind, row.cache_shape) == (
            p.skip_from, p.merge_into, p.kind, p.cache_shape,
        )  # fmt: skip
        assert p.num_branches == len(table)


def test_the_runtime_runs_plans() -> None:
    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()
    cached = fxcache.transform(model, branch=2, interval=2)
    cached(x, t)
    (p,) = cached.plans.values()
    assert p.branch == 2 and p.cache_spec == fxcache.plan(model, (x, t), branch=2).cache_spec
    (slot,) = cached.slots.values()
    (feature,) = slot.contents()
    assert feature.shape == p.cache_shape and feature.abs().sum() > 0, "the full step the runtime ran left its feature"


def test_plan_errors() -> None:
    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()
    with pytest.raises(ValueError, match=r"branch=3 is out of range: this model has 3 skip connections"):
        fxcache.plan(model, (x, t), branch=3)
    with pytest.raises(ValueError, match="branch=-1 is out of range"):
        fxcache.plan(model, (x, t), branch=-1)
    with pytest.raises(fxcache.CaptureError):
        fxcache.plan(models.DataDependent().eval(), (x, t))
