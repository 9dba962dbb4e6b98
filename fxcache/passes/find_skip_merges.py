"""Find the long skip connections of a U-Net-like graph, structurally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

from fxcache.predicates import is_add, is_concat, is_downsample, tensor_meta

__all__ = ["SkipMerge", "find_skip_merges"]


@dataclass(frozen=True, eq=False)
class SkipMerge:
    """One long skip connection.

    Attributes:
        merge: the node where the skip rejoins (``aten.cat`` or ``aten.add``).
        skip: the input of ``merge`` that left the down path early: ``source`` itself, or ``source``
            transformed on its way to the merge without losing resolution (a ControlNet residual added,
            FreeU's Fourier filter, a scale, a 1x1 projection).
        deep: the other input of ``merge``, produced by the deep path: what a shallow step reads
            from the cache.
        kind: ``"concat"`` or ``"add"``.
        source: where the skip leaves the down path: an ancestor of ``deep`` (``skip`` when untransformed).
    """

    merge: fx.Node
    skip: fx.Node
    deep: fx.Node
    kind: Literal["concat", "add"]
    source: fx.Node | None = None

    def __post_init__(self) -> None:
        if self.source is None:
            object.__setattr__(self, "source", self.skip)


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


def _no_lowering_masks(nodes: list[fx.Node], index: dict[fx.Node, int], lowered: int) -> dict[fx.Node, int]:
    # Bit i of masks[n] is set when nodes[i] reaches n (or is n) along a path on which no node after
    # nodes[i] lowers the resolution: n is nodes[i] at the same resolution, possibly transformed.
    masks: dict[fx.Node, int] = {}
    for n in nodes:
        m = 1 << index[n]
        if not lowered >> index[n] & 1:
            for a in n.all_input_nodes:
                m |= masks[a]
        masks[n] = m
    return masks


def _spatial(node: fx.Node) -> tuple[int, ...] | None:
    # The spatial size of a feature map (batch, channels, *spatial), None for anything else.
    t = tensor_meta(node)
    return tuple(t.shape[2:]) if t is not None and t.dim() >= 3 else None


def _peel_injected(deep: fx.Node, source: fx.Node, anc: dict[fx.Node, int], index: dict[fx.Node, int]) -> fx.Node:
    # A tensor added to the deep path from outside it (ControlNet's mid-block residual, added to the mid block's
    # output just before the deepest merge) is an input of every step, not part of the feature to cache: cut
    # before the addition, so a shallow step adds the current step's tensor, as DeepCache's helper does.
    def from_source(n: object) -> bool:
        return isinstance(n, fx.Node) and (n is source or bool(anc[n] >> index[source] & 1))

    while is_add(deep):
        a, b = deep.args[0], deep.args[1]
        if from_source(a) and not from_source(b):
            deep = a
        elif from_source(b) and not from_source(a):
            deep = b
        else:
            break
    return deep


def find_skip_merges(gm: fx.GraphModule) -> list[SkipMerge]:
    """All long skip merges of ``gm``, shallowest first.

    A long skip merge is either

    * a concatenation of two tensors where one is an ancestor of the other, or
    * an addition of a tensor ``s`` and a descendant ``d`` of ``s`` where some node on a path from
      ``s`` to ``d`` lowers the spatial resolution (a strided convolution or a pooling);
    * either of the above with the skip operand *transformed* on its way to the merge: the operand is
      not an ancestor of the other, but a tensor ``s`` that is reaches it without losing resolution
      (``s + residual``, a Fourier filter of ``s``, ``s * scale``, a 1x1 convolution of ``s``). Then
      ``s`` is the source, and the operand with fewer nodes between it and ``s`` is the skip. Here both
      operands and ``s`` must be feature maps (at least 3-D) of one spatial size, which keeps out the
      timestep embedding's ``cat([sin(e), cos(e)])`` and its broadcast addition in every ResNet block.

    The lowering rule for additions is what keeps residual additions inside a ResNet block or a
    transformer layer out: their paths never leave the resolution they started at.

    Pre: ``gm`` is a captured ATen graph with ``node.meta["val"]`` set (see :mod:`fxcache.capture`).
    ``deep`` is the merge's other operand, less any tensor added to it from outside the deep path (a
    ControlNet residual): that addition stays in the shallow graph.

    Post: pure; ``gm`` is not modified. The list is sorted by where the skip leaves the down path
    (``source``; earlier = shallower); the same skip merged twice counts the outer merge as shallower.
    Transforming skips (ControlNet residuals, FreeU) neither adds nor removes merges, nor reorders them.
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
    same_res = _no_lowering_masks(nodes, index, lowered)

    def transformed(skip: fx.Node, deep: fx.Node) -> tuple[fx.Node, int] | None:
        # The latest common ancestor that reaches `skip` at its own resolution, and how many nodes lie
        # between it and `skip` (the transform's length).
        common = same_res[skip] & anc[deep]
        if not common:
            return None
        source = nodes[common.bit_length() - 1]
        if _spatial(source) != _spatial(skip):
            return None  # e.g. a time embedding broadcast over the feature map: not the same tensor transformed
        return source, (desc[source] & anc[skip]).bit_count()

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
            skip, deep, source = a, b, a
        elif anc[a] >> index[b] & 1:
            skip, deep, source = b, a, b
        elif _spatial(a) is not None and _spatial(a) == _spatial(b):
            ta, tb = transformed(a, b), transformed(b, a)
            if ta is None and tb is None:
                continue
            if tb is None or (ta is not None and ta[1] <= tb[1]):
                skip, deep, source = a, b, ta[0]  # type: ignore[index]
            else:
                skip, deep, source = b, a, tb[0]
        else:
            continue
        if kind == "add" and not (desc[source] & anc[deep] & lowered):
            continue  # a residual at one resolution, not a long skip
        deep = _peel_injected(deep, source, anc, index)
        found.append(SkipMerge(merge=n, skip=skip, deep=deep, kind=kind, source=source))
    found.sort(key=lambda m: (index[m.source], -index[m.merge]))
    return found
