"""``fxcache.explain``: what the analysis found, as data that prints as a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fxcache.fx_source_cache import forget_fx_sources, fx_sources
from fxcache.plan import no_skip_message, plan_branches

__all__ = ["Branch", "BranchTable", "explain", "ideal_speedup"]

_INTERVALS = (2, 3, 4, 5)


def ideal_speedup(interval: int, flops_fraction: float) -> float:
    """N / (1 + (N - 1) f): the speedup of one full step per N when a shallow step costs f of a full one.

    Example:
        >>> round(ideal_speedup(3, 0.079), 2)  # SD1.5 at 512 px, branch 0: f = 0.079 with attention counted
        2.59
    """
    return interval / (1 + (interval - 1) * flops_fraction)


@dataclass(frozen=True)
class Branch:
    """One place fxcache can cut the model.

    Attributes:
        index: the ``branch=`` value that selects it (0 = shallowest skip).
        skip_from: module the skip tensor leaves from (``"<input>"`` for a model input).
        merge_into: module where it rejoins the deep path.
        kind: ``"concat"`` or ``"add"``.
        cache_shape: shape of the deep feature a shallow step reads from the cache.
        flops_fraction: FLOPs of a shallow step over FLOPs of a full step (convolutions, linear layers and
            attention; see :func:`fxcache.passes.flops_by_node`).
    """

    index: int
    skip_from: str
    merge_into: str
    kind: str
    cache_shape: tuple[int, ...]
    flops_fraction: float

    def speedup(self, interval: int) -> float:
        """Predicted speedup at ``interval`` from FLOPs alone."""
        return ideal_speedup(interval, self.flops_fraction)

    def __str__(self) -> str:
        shape = "x".join(map(str, self.cache_shape))
        return (
            f"branch {self.index}: {self.skip_from} -> {self.merge_into} ({self.kind}), cache {shape}, "
            f"shallow step {100 * self.flops_fraction:.1f}% of full FLOPs"
        )


class BranchTable(list):  # list[Branch] that prints as a table
    def __init__(self, rows: Any = (), model: str = "the model") -> None:
        super().__init__(rows)
        self.model = model  # the model's class name, for the empty table's message

    def __str__(self) -> str:
        if not self:
            return no_skip_message(self.model)
        head = ["branch", "skip from", "merges into", "kind", "cache", "shallow FLOPs"]
        head += [f"N={n}" for n in _INTERVALS]
        rows = [
            [
                str(b.index), b.skip_from, b.merge_into, b.kind, "x".join(map(str, b.cache_shape)),
                f"{100 * b.flops_fraction:.1f}%", *(f"{b.speedup(n):.2f}x" for n in _INTERVALS),
            ]
            for b in self
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            "N=k: predicted speedup with one full step every k steps, from FLOPs alone "
            "(convolutions, linear layers and attention)."
        )
        return "\n".join(lines)

    __repr__ = __str__


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> BranchTable:
    """List the branches fxcache can cut ``model`` at, for inputs like ``args``/``kwargs``.

    Captures the model once (as :func:`fxcache.transform` would at its first call) and builds the
    :class:`fxcache.CachePlan` of every branch from that capture: each row is read off its plan, and
    its FLOPs share is the plan's ``flops_fraction``. The model is not modified and is not run on real data.
    A model without skip connections (a ControlNet, a plain encoder) gives an empty table that prints why.

    Example:
        >>> import torch, fxcache
        >>> class UNetish(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.inp = torch.nn.Conv2d(3, 8, 3, padding=1)
        ...         self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        ...         self.mid = torch.nn.Conv2d(8, 8, 3, padding=1)
        ...         self.up = torch.nn.Upsample(scale_factor=2)
        ...         self.out = torch.nn.Conv2d(16, 3, 3, padding=1)
        ...     def forward(self, x):
        ...         h = self.inp(x)
        ...         return self.out(torch.cat([self.up(self.mid(self.down(h))), h], dim=1))
        >>> branches = fxcache.explain(UNetish(), torch.randn(1, 3, 16, 16))
        >>> print(branches[0])
        branch 0: inp -> out (concat), cache 1x8x16x16, shallow step 69.2% of full FLOPs
    """
    with fx_sources() as made:  # the plans are dropped once read: their torch.fx sources go with them
        rows = [
            Branch(
                index=p.branch,
                skip_from=p.skip_from,
                merge_into=p.merge_into,
                kind=p.kind,
                cache_shape=p.cache_shape,
                flops_fraction=p.flops_fraction,
            )
            for p in plan_branches(model, args, kwargs)
        ]
    forget_fx_sources(made)
    return BranchTable(rows, model=type(model).__name__)
