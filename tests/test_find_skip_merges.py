from __future__ import annotations

import pytest
import torch

from fxcache.capture import capture
from fxcache.passes import find_skip_merges
from fxcache.predicates import module_path
from tests import models


def _merges(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> list:
    return find_skip_merges(capture(model, args, kwargs or {}).gm)


@pytest.mark.parametrize("merge", ["cat", "add"])
def test_plain_unet_skips_found_and_residuals_ignored(merge: str) -> None:
    found = _merges(models.PlainUNet(merge).eval(), models.plain_inputs())
    assert len(found) == 3, f"expected 3 long skips, found {len(found)}: residual or attention adds leaked in?"
    assert {m.kind for m in found} == {"concat" if merge == "cat" else "add"}
    # shallowest first: the stem's skip merges into the output block
    assert [module_path(m.merge) for m in found] == ["<top>"] * 3
    assert [m.deep.name.startswith("upsample") for m in found] == [True] * 3, "deep input must come up the U"


def test_no_long_skip_in_residual_and_attention_network() -> None:
    assert _merges(models.NoSkipNet().eval(), models.plain_inputs()) == []


@pytest.mark.parametrize(
    ("build", "inputs", "count"),
    [(models.sd_unet, models.sd_inputs, 12), (models.sdxl_unet, models.sdxl_inputs, 9)],
    ids=["sd", "sdxl"],
)
def test_diffusers_condition_unets(build, inputs, count: int) -> None:
    unet = build()
    args, kwargs = inputs()
    found = _merges(unet, args, kwargs)
    assert len(found) == count, f"{len(found)} skips found, DeepCache counts {count}"
    assert all(m.kind == "concat" for m in found)
    assert module_path(found[0].skip) == "conv_in", "branch 0 is the skip from conv_in"
    assert module_path(found[-1].deep).startswith("mid_block"), "the deepest branch caches the mid block"
    # every merge happens in an up block, deepest skip in the first up block
    assert [module_path(m.merge).split(".")[:1] for m in found] == [["up_blocks"]] * count


def test_diffusers_unet2d_model() -> None:
    found = _merges(models.unet2d(), (torch.randn(2, 3, 16, 16), torch.tensor(10)))
    assert len(found) == 6
    assert module_path(found[0].skip) == "conv_in"


def test_pure_function_does_not_modify_graph() -> None:
    gm = capture(models.PlainUNet().eval(), models.plain_inputs(), {}).gm
    before = str(gm.graph)
    find_skip_merges(gm)
    assert str(gm.graph) == before
