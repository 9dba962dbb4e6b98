from __future__ import annotations

import pytest
import torch

from fxcache.capture import capture, flatten_call
from fxcache.passes import find_skip_merges, split_at_branch
from fxcache.passes.split_at_branch import CACHE_INPUT
from fxcache.predicates import module_path
from tests import models


@pytest.fixture(scope="module")
def sd():
    unet = models.sd_unet()
    args, kwargs = models.sd_inputs()
    cap = capture(unet, args, kwargs)
    leaves, _ = flatten_call(unet, args, kwargs)
    return unet, cap, leaves, find_skip_merges(cap.gm)


def _ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("branch", [0, 1, 3, 11])
def test_shallow_graph_holds_no_deep_path(sd, branch: int) -> None:
    _, cap, _, merges = sd
    full, shallow = split_at_branch(cap.gm, merges[branch])
    paths = {module_path(n) for n in _ops(shallow)}
    assert not any(p.startswith("mid_block") for p in paths), "the mid block must not be in the shallow graph"
    downs_kept = {p.split(".")[1] for p in paths if p.startswith("down_blocks.")}
    assert downs_kept <= {"0", "1", "2", "3"}
    if branch == 0:
        assert not downs_kept, f"branch 0 keeps no down block, kept {sorted(downs_kept)}"
        assert {p.split(".")[1] for p in paths if p.startswith("up_blocks.")} == {"3"}, "only the last up block"
    assert len(_ops(shallow)) < len(_ops(full)), "the shallow graph must be smaller"
    kept = {n.name for n in shallow.graph.nodes}
    for j, m in enumerate(merges):
        where = "above or at" if j <= branch else "below"
        assert (m.merge.name in kept) == (j <= branch), f"merge {j} lies {where} the cut at {branch}"


def test_placeholders_and_outputs(sd) -> None:
    _, cap, leaves, merges = sd
    full, shallow = split_at_branch(cap.gm, merges[0])
    inputs = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    full_in = [n for n in full.graph.nodes if n.op == "placeholder"]
    shallow_in = [n for n in shallow.graph.nodes if n.op == "placeholder"]
    assert len(full_in) == len(inputs) == len(leaves)
    assert len(shallow_in) == len(inputs) + 1 and shallow_in[-1].name == CACHE_INPUT
    assert tuple(shallow_in[-1].meta["val"].shape) == (2, 32, 16, 16), "cache buffer shape for branch 0"
    outs = full(*leaves)
    assert len(outs) == 2 and outs[-1].shape == (2, 32, 16, 16), "full graph returns outputs + the deep feature"


@pytest.mark.parametrize("branch", [0, 2, 5, 11])
def test_shallow_fed_same_inputs_equals_full_exactly(sd, branch: int) -> None:
    unet, cap, leaves, merges = sd
    full, shallow = split_at_branch(cap.gm, merges[branch])
    with torch.no_grad():
        *out_full, deep = full(*leaves)
        out_shallow = shallow(*leaves, deep)
        eager = unet(*leaves[:2], encoder_hidden_states=leaves[2]).sample
    assert torch.equal(out_full[0], eager), "full graph must equal the original model bit for bit"
    assert torch.equal(out_shallow[0], out_full[0]), "shallow step with a fresh cache must equal the full step"


def test_split_shares_parameters(sd) -> None:
    unet, cap, _, merges = sd
    full, shallow = split_at_branch(cap.gm, merges[0])
    ids = {id(p) for p in unet.parameters()}
    for gm in (full, shallow):
        assert all(id(p) in ids for p in gm.parameters()), "subgraphs must share, not copy, the weights"
