from __future__ import annotations

import pytest

import fxcache
from fxcache.explain import ideal_speedup
from tests import models


@pytest.fixture(scope="module")
def sd_branches() -> fxcache.BranchTable:
    args, kwargs = models.sd_inputs()
    return fxcache.explain(models.sd_unet(), *args, **kwargs)


def test_branch_fields(sd_branches) -> None:
    assert [b.index for b in sd_branches] == list(range(12))
    first = sd_branches[0]
    assert isinstance(first, fxcache.Branch)
    assert (first.skip_from, first.merge_into, first.kind) == ("conv_in", "up_blocks.3.resnets.2", "concat")
    assert first.cache_shape == (2, 32, 16, 16)
    assert sd_branches[11].skip_from == "down_blocks.3.resnets.1" and sd_branches[11].cache_shape == (2, 64, 2, 2)


def test_flops_fraction_grows_with_depth(sd_branches) -> None:
    fractions = [b.flops_fraction for b in sd_branches]
    assert all(0 < f < 1 for f in fractions)
    assert fractions == sorted(fractions), "a deeper cut keeps more of the network"


def test_table_shows_predicted_speedups(sd_branches) -> None:
    text = str(sd_branches)
    assert text.splitlines()[0].split()[:2] == ["branch", "skip"]
    for n in (2, 3, 4, 5):
        assert f"N={n}" in text
    assert f"{ideal_speedup(5, sd_branches[0].flops_fraction):.2f}x" in text.splitlines()[2]
    assert str(sd_branches[0]).startswith("branch 0: conv_in -> up_blocks.3.resnets.2 (concat)")


def test_ideal_speedup() -> None:
    assert ideal_speedup(1, 0.5) == 1.0
    assert round(ideal_speedup(5, 0.061), 2) == 4.02  # FACTS.md: about 4.0x at N=5


def test_explain_does_not_modify_model() -> None:
    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()
    before = model(x, t)
    assert len(fxcache.explain(model, x, t)) == 3
    assert (model(x, t) == before).all()


def test_explain_leaves_no_fx_sources_and_says_why_a_table_is_empty() -> None:
    # Issue 26 items 9 and 10: explain kept 32 torch.fx sources per call; on a model without skips (a
    # ControlNet) it printed an empty table.
    from torch.fx.graph_module import _loader

    model = models.PlainUNet().eval()
    x, t = models.plain_inputs()
    fxcache.explain(model, x, t)  # warm: torch's own one-time sources
    before = set(_loader.eval_cache)
    assert len(fxcache.explain(model, x, t)) == 3
    assert set(_loader.eval_cache) <= before, "explain's plans are dropped with their sources"
    table = fxcache.explain(models.NoSkipNet().eval(), x, t)
    assert len(table) == 0 and "no skip connection was found in NoSkipNet" in str(table)
