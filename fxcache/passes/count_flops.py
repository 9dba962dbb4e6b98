"""Count the FLOPs of a graph, node by node, without running it on real data."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "flops_by_node"]


class _PerNodeFlops(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops[n.name] = int(self.counter.get_total_flops() - before)
        return out


def flops_by_node(gm: fx.GraphModule) -> dict[str, int]:
    """FLOPs of each node of ``gm`` (by node name), counted by torch's FlopCounterMode on fake tensors.

    Input shapes come from the placeholders' ``meta["val"]``; non-tensor placeholders get the value
    recorded there. Only matmul-like ops (convolutions, linear layers, attention) count, as in
    torch's own counter. One fake run serves every subgraph of ``gm``: sum the nodes it keeps.

    Pre: every tensor placeholder has ``meta["val"]``. Post: pure.
    """
    with FakeTensorMode(allow_non_fake_inputs=True):
        args = []
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                val = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
            args.append(val)
        with FlopCounterMode(display=False) as counter:
            interpreter = _PerNodeFlops(gm, counter)
            interpreter.run(*args)
    return interpreter.flops


def count_flops(gm: fx.GraphModule) -> int:
    """FLOPs of one call of ``gm``.

    Example:
        >>> import torch
        >>> from fxcache.capture import capture
        >>> count_flops(capture(torch.nn.Linear(4, 3, bias=False), (torch.randn(2, 4),), {}).gm)
        48
    """
    return sum(flops_by_node(gm).values())
