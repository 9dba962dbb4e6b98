"""Find the long skip connections of a U-Net-like graph, structurally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

from fxcache.predicates import is_add, is_concat, is_downsample

__all__ = ["SkipMerge", "find_skip_merges"]


@dataclass(frozen=True, eq=False)
class SkipMerge:
    """One long skip connection.

    Attributes:
        merge: the node where the skip rejoins (``aten.cat`` or ``aten.add``).
        skip: the input of ``merge`` that left the down path early (an ancestor of ``deep``).
        deep: the other input of ``merge``, produced by the deep path: what a shallow step reads
            from the cache.
        kind: ``"concat"`` or ``"add"``.
    """

    merge: fx.Node
    skip: fx.Node
    deep: fx.Node
    kind: Literal["concat", "add"]


def _ancestor_masks(nodes: list[fx.Node], index: dict[fx.Node, int]) -> dict[fx.Node, int]:
    # Bit i of masks[n] is set when nodes[i] is a strict ancestor of n: one pass in topological order.
    masks: dict[fx.Node, int] = {}
    for n in nodes:
        m = 0
        for a in n.all_input_nodes:
            m |= masks[a] | (1 << index[a])
        masks[n] = m
    return masks


def _descendant_masks(nodes: list[fx.Node], index: dict[fx.Node, int]) -> dict[fx.Node, int]:
    masks: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        m = 0
        for u in n.users:
            m |= masks[u] | (1 << index[u])
        masks[n] = m
    return masks


def find_skip_merges(gm: fx.GraphModule) -> list[SkipMerge]:
    """All long skip merges of ``gm``, shallowest first.

    A long skip merge is either

    * a concatenation of two tensors where one is an ancestor of the other, or
    * an addition of a tensor ``s`` and a descendant ``d`` of ``s`` where some node on a path from
      ``s`` to ``d`` lowers the spatial resolution (a strided convolution or a pooling).

    The second rule is what keeps residual additions inside a ResNet block or a transformer layer
    out: their paths never leave the resolution they started at.

    Pre: ``gm`` is a captured ATen graph with ``node.meta["val"]`` set (see :mod:`fxcache.capture`).
    Post: pure; ``gm`` is not modified. The list is sorted by where the skip tensor leaves the down
    path (earlier = shallower); the same skip merged twice counts the outer merge as shallower.
    For diffusers U-Nets with two layers per down block this order equals DeepCache's ``cache_branch_id``.

    Example:
        >>> import torch
        >>> from fxcache.capture import capture
        >>> class TinyUNet(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        ...         self.up = torch.nn.Upsample(scale_factor=2)
        ...     def forward(self, x):
        ...         return torch.cat([self.up(self.down(x)), x], dim=1)
        >>> merges = find_skip_merges(capture(TinyUNet(), (torch.randn(1, 4, 8, 8),), {}).gm)
        >>> [(m.kind, m.skip.op) for m in merges]
        [('concat', 'placeholder')]
    """
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    anc = _ancestor_masks(nodes, index)
    desc = _descendant_masks(nodes, index)
    lowered = 0
    for n in nodes:
        if is_downsample(n):
            lowered |= 1 << index[n]

    found: list[SkipMerge] = []
    for n in nodes:
        if is_concat(n):
            a, b = n.args[0]
            kind: Literal["concat", "add"] = "concat"
        elif is_add(n):
            a, b = n.args[0], n.args[1]
            kind = "add"
        else:
            continue
        if a is b:
            continue
        if anc[b] >> index[a] & 1:
            skip, deep = a, b
        elif anc[a] >> index[b] & 1:
            skip, deep = b, a
        else:
            continue
        if kind == "add" and not (desc[skip] & anc[deep] & lowered):
            continue  # a residual at one resolution, not a long skip
        found.append(SkipMerge(merge=n, skip=skip, deep=deep, kind=kind))
    found.sort(key=lambda m: (index[m.skip], -index[m.merge]))
    return found
