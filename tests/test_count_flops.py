"""count_flops / flops_fraction against torch's FlopCounterMode run on the real eager model.

The reference is torch's own counter on real tensors, given a formula for the CPU attention kernel it leaves
out (torch's ``sdpa_flop_count``, the one its GPU kernels use) and with PyTorch's fused eager fast paths
switched off, so that it sees nn.MultiheadAttention and nn.TransformerEncoderLayer as their linears and
attention. fxcache counts the captured graph on fake tensors, fused ops included (a capture under no_grad
keeps them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import fxcache
from fxcache.capture import capture
from fxcache.passes import count_flops, flops_by_node
from fxcache.plan import plan_branches
from tests import models

aten = torch.ops.aten


def _cpu_sdpa(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


@contextmanager
def _no_fast_path() -> Iterator[None]:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _eager_counts(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, int]:
    """torch's FlopCounterMode on one eager call: FLOPs by module path (``"Global"`` for the whole call)."""
    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}
    with torch.no_grad(), _no_fast_path(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as c:
        model(*args, **kwargs)
    return {name: sum(by_op.values()) for name, by_op in c.get_flop_counts().items()}


def _ops(gm: torch.fx.GraphModule) -> set[str]:
    return {n.target.__name__.split(".")[0] for n in gm.graph.nodes if n.op == "call_function"}


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=48, batch_first=True, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _Attend(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("lk, d_v", [(5, 4), (7, 6)], ids=["self", "cross-with-other-value-dim"])
def test_attention_counts_both_matmuls(lk: int, d_v: int) -> None:
    # 2·B·h·Lq·Lk·d_qk for the scores, 2·B·h·Lq·Lk·d_v for the weighted sum. With equal head dims the CPU runs
    # its flash kernel (which torch's counter leaves out); otherwise the math path's matmuls.
    b, h, lq, d_qk = 2, 3, 5, 4
    q, k, v = torch.randn(b, h, lq, d_qk), torch.randn(b, h, lk, d_qk), torch.randn(b, h, lk, d_v)
    flops = flops_by_node(capture(_Attend(), (q, k, v), {}).gm)
    expected = 2 * b * h * lq * lk * (d_qk + d_v)
    assert flops["scaled_dot_product_attention"] == expected, f"{flops}, expected {expected} for the SDPA node"


@pytest.fixture(scope="module")
def sd() -> tuple[list[fxcache.CachePlan], dict[str, int]]:
    """The tiny SD U-Net's plans (one capture, under no_grad) and its eager FLOPs by module."""
    unet, (args, kwargs) = models.sd_unet(blocks=2), models.sd_inputs()
    with torch.no_grad():
        plans = plan_branches(unet, args, kwargs)
    return plans, _eager_counts(unet, args, kwargs)


def test_sd_full_step_agrees_with_flop_counter_on_eager(sd) -> None:
    plans, eager = sd
    assert "scaled_dot_product_attention" in _ops(plans[0].captured.gm), "the graph should hold SDPA"
    counted = count_flops(plans[0].captured.gm)
    assert counted == pytest.approx(eager["Global"], rel=0.01), f"fxcache counts {counted}, eager {eager['Global']}"


@pytest.mark.parametrize(
    "name, fused, module",
    [
        ("PlainUNet", "_native_multi_head_attention", "PlainUNet.mid.2.attn"),
        ("TransformerEncoderLayer", "_transformer_encoder_layer_fwd", "_Encoder.layer"),
    ],
)
def test_fused_full_step_agrees_with_flop_counter_on_eager(name: str, fused: str, module: str) -> None:
    if name == "PlainUNet":
        model, args = models.PlainUNet().eval(), models.plain_inputs()
    else:
        model, args = _Encoder().eval(), (torch.randn(2, 6, 16),)
    with torch.no_grad():
        gm = capture(model, args, {}).gm
    assert fused in _ops(gm), f"the no_grad capture of {name} should hold {fused}, has {sorted(_ops(gm))}"
    eager, flops = _eager_counts(model, args, {}), flops_by_node(gm)
    fused_flops = sum(flops[n.name] for n in gm.graph.nodes if n.op == "call_function" and fused in str(n.target))
    assert fused_flops == pytest.approx(eager[module], rel=0.01), f"{fused}: {fused_flops}, {module}: {eager[module]}"
    counted = sum(flops.values())
    assert counted == pytest.approx(eager["Global"], rel=0.01), f"{name}: fxcache {counted}, eager {eager['Global']}"


# The modules a shallow step runs, per branch, as DeepCache's own helper lists them: everything else is
# the deep part the cache replaces.
_SD_SHALLOW = {
    0: ["time_embedding", "conv_in", "up_blocks.1.resnets.2", "up_blocks.1.attentions.2", "conv_out"],
    1: [
        "time_embedding", "conv_in", "down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
        "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.1.resnets.2", "up_blocks.1.attentions.2",
        "conv_out",
    ],
}  # fmt: skip
_PLAIN_DEEP = {0: ["down1", "down2", "mid", "up2", "up1"], 1: ["down2", "mid", "up2"], 2: ["mid"]}


def test_sd_flops_fraction_agrees_with_flop_counter_on_eager(sd) -> None:
    plans, eager = sd
    for branch, modules in _SD_SHALLOW.items():
        expected = sum(eager[f"UNet2DConditionModel.{m}"] for m in modules) / eager["Global"]
        got = plans[branch].flops_fraction
        assert got == pytest.approx(expected, rel=0.01), f"branch {branch}: fxcache {got:.4f}, eager {expected:.4f}"


def test_plain_flops_fraction_agrees_with_flop_counter_on_eager() -> None:
    model, args = models.PlainUNet().eval(), models.plain_inputs()
    eager = _eager_counts(model, args, {})
    for branch, deep in _PLAIN_DEEP.items():
        expected = 1 - sum(eager[f"PlainUNet.{m}"] for m in deep) / eager["Global"]
        with torch.no_grad():  # the graph holds _native_multi_head_attention
            got = fxcache.plan(model, args, branch=branch).flops_fraction
        assert got == pytest.approx(expected, rel=0.01), f"branch {branch}: fxcache {got:.4f}, eager {expected:.4f}"


def test_attention_share_as_the_issue_measured_it() -> None:
    # issue 21: on this small 3-block U-Net branch 1 keeps 0.41 of the FLOPs without attention, 0.48 with it.
    unet, (args, kwargs) = models.sd_unet(layers_per_block=1, blocks=3), models.sd_inputs()
    with torch.no_grad():
        f = fxcache.plan(unet, args, kwargs, branch=1).flops_fraction
    assert round(f, 2) == 0.48, f"branch 1 keeps {f:.4f} of the FLOPs; attention counted it is 0.48"
