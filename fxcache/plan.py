"""``fxcache.plan``: the build step, as a value. Capture, find the skips, cut at one.

A :class:`CachePlan` holds everything one input signature needs: the full graph (which also returns the feature
to cache) and the shallow graph (which takes it), the feature's spec, where the skip leaves and rejoins, and the
input/output structure. The runtime (:class:`fxcache.CachedModule`) runs plans, the backends
(:mod:`fxcache.backends`) turn a plan into callables, and :func:`fxcache.explain` reports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxcache.capture import Captured, Signature, capture, flatten_call
from fxcache.fx_source_cache import fx_sources
from fxcache.passes import SkipMerge, find_skip_merges, split_at_branch
from fxcache.predicates import merge_site, module_path, tensor_meta

__all__ = ["CachePlan", "CacheSpec", "plan", "plan_branches", "select_branch"]


@dataclass(frozen=True)
class CacheSpec:
    """Shape, dtype and device of the cached deep feature."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True, eq=False)
class CachePlan:
    """What running DeepCache on one input signature needs, built once by :func:`plan`: two graphs whose cached
    feature is an ordinary output of one and input of the other.

    Attributes:
        full: ``full(*leaves) -> (*outputs, *features)``: the model's flat outputs, then the feature(s) a shallow
            step needs (one for a U-Net cut: the deep tensor entering the skip merge).
        shallow: ``shallow(*leaves, *features) -> outputs``: the flat outputs computed from those features.
        feature_specs: shape, dtype and device of each feature, in the order ``full`` returns them.
        merge: the skip merge the graph is cut at (nodes of ``captured.gm``).
        branch: the ``branch=`` that selected it; ``num_branches``: how many the model has.
        captured: the whole captured graph, its output structure and its parameter names.
        signature: the input signature the graphs are specialised on (``signature.spec`` is the
            input structure: ``(args, sorted kwargs)``).

    Where a feature lives between the steps is a backend's choice (:mod:`fxcache.backends`): a buffer bound into
    both graphs at a fixed address (eager, Inductor, CUDA graphs) or the tensor itself (an ahead-of-time package).
    """

    full: fx.GraphModule
    shallow: fx.GraphModule
    feature_specs: tuple[CacheSpec, ...]
    merge: SkipMerge
    branch: int
    num_branches: int
    captured: Captured
    signature: Signature
    fx_sources: tuple[str, ...] = ()  # torch.fx's cached sources of the GraphModules made for this plan

    @property
    def cache_spec(self) -> CacheSpec:
        """The spec of the (first) feature: what explain shows as the cache."""
        return self.feature_specs[0]

    @property
    def cache_shape(self) -> tuple[int, ...]:
        return self.cache_spec.shape

    @property
    def skip_from(self) -> str:
        """The module the skip tensor leaves from (``"<input>"`` for a model input), as explain shows it."""
        return module_path(self.merge.skip)

    @property
    def merge_into(self) -> str:
        """The module where the skip rejoins the deep path, as explain shows it."""
        return merge_site(self.merge.merge)

    @property
    def kind(self) -> str:
        """``"concat"`` or ``"add"``."""
        return self.merge.kind

    @property
    def out_spec(self) -> pytree.TreeSpec:
        """The model's output structure; :meth:`unflatten` rebuilds it from a graph's flat outputs."""
        return self.captured.out_spec

    @cached_property
    def flops_fraction(self) -> float:
        """FLOPs of a shallow step over FLOPs of a full step (convolutions, linear layers and attention, counted
        on fake tensors by :func:`fxcache.passes.flops_by_node`).

        The shallow count is over the nodes the shallow graph itself keeps: one rule, the split's.
        """
        flops = self.captured.node_flops
        total = sum(flops.values())
        kept = sum(flops[n.name] for n in self.shallow.graph.nodes if n.op == "call_function")
        return kept / total if total else float("nan")

    @cached_property
    def shallow_inputs(self) -> tuple[int, ...]:
        """Indices of the leaves (as :meth:`flatten` orders them) that the shallow graph reads.

        The shallow graph takes every leaf, but reads only those the layers above the cut use. A pipeline
        adapter uses this to skip computing the others on shallow steps (ControlNet residuals of deeper skips).
        """
        placeholders = [n for n in self.shallow.graph.nodes if n.op == "placeholder"]
        leaves = placeholders[: len(placeholders) - len(self.feature_specs)]
        return tuple(i for i, n in enumerate(leaves) if n.users)

    def flatten(self, args: tuple, kwargs: Mapping[str, Any] | None = None) -> list[Any]:
        """The leaves ``full`` and ``shallow`` take for a call ``model(*args, **kwargs)`` of this signature."""
        return pytree.tree_leaves((tuple(args), dict(sorted((kwargs or {}).items()))))

    def unflatten(self, flat_out: Any) -> Any:
        """The model's output (tensor, tuple, dataclass...) from a graph's flat outputs."""
        return self.captured.unflatten(flat_out)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.cache_shape))
        return (
            f"CachePlan(branch={self.branch} of {self.num_branches}: {self.skip_from} -> {self.merge_into} "
            f"({self.kind}), cache {shape} {self.cache_spec.dtype}, shallow step "
            f"{100 * self.flops_fraction:.1f}% of full FLOPs)"
        )


def no_skip_message(name: str) -> str:
    """What to tell a user whose model ``name`` has no skip connection to cut."""
    return (
        f"no skip connection was found in {name}: fxcache looks for a concatenation of a tensor with "
        "one computed from it, or an addition of a tensor with one computed from it through lower "
        "resolution (a U-Net's long skips). DeepCache needs such a skip to cut the network; this model "
        "has none, so it cannot be cached. The model was not modified."
    )


def select_branch(merges: list[SkipMerge], branch: int, model: torch.nn.Module) -> SkipMerge:
    """The merge for ``branch``, or a ValueError that says what the model has.

    Example:
        >>> select_branch([], 0, torch.nn.Identity())
        Traceback (most recent call last):
        ...
        ValueError: no skip connection was found in Identity: ...
    """
    name = type(model).__name__
    if not merges:
        raise ValueError(no_skip_message(name))
    if branch >= len(merges):
        raise ValueError(
            f"branch={branch} is out of range: this model has {len(merges)} skip connections "
            f"(0..{len(merges) - 1}). Run fxcache.explain(model, *inputs) to see them. The model was not modified."
        )
    return merges[branch]


def _build(captured: Captured, merges: list[SkipMerge], branch: int, signature: Signature) -> CachePlan:
    merge = merges[branch]
    deep = tensor_meta(merge.deep)
    assert deep is not None, "a skip merge's deep input is always a tensor"
    full, shallow = split_at_branch(captured.gm, merge)
    spec = CacheSpec(tuple(deep.shape), deep.dtype, deep.device)
    return CachePlan(full, shallow, (spec,), merge, branch, len(merges), captured, signature)


def plan(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None, *, branch: int = 0) -> CachePlan:
    """Capture ``model(*args, **kwargs)`` and cut it at skip connection ``branch``: a :class:`CachePlan`.

    The same build step :func:`fxcache.transform` runs at its first call for each input signature
    (in the style of ``torch.export.export(mod, args, kwargs)``). The model is not modified and is
    not run on real data; the plan's graphs share its weights.

    Raises:
        ValueError: ``branch`` is negative or beyond the model's skips, or the model has none.
        fxcache.CaptureError: the model cannot be captured as one graph.

    Example:
        >>> import torch, fxcache
        >>> class UNetish(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.inp = torch.nn.Conv2d(3, 8, 3, padding=1)
        ...         self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        ...         self.up = torch.nn.Upsample(scale_factor=2)
        ...         self.out = torch.nn.Conv2d(16, 3, 3, padding=1)
        ...     def forward(self, x):
        ...         h = self.inp(x)
        ...         return self.out(torch.cat([self.up(self.down(h)), h], dim=1))
        >>> net, x = UNetish(), torch.randn(1, 3, 16, 16)
        >>> p = fxcache.plan(net, (x,), branch=0)
        >>> p.skip_from, p.merge_into, p.cache_shape, p.num_branches
        ('inp', 'out', (1, 8, 16, 16), 1)
        >>> leaves = p.flatten((x,))
        >>> *outputs, feature = p.full(*leaves)                     # the outputs, then the feature to cache
        >>> shallow = p.unflatten(p.shallow(*leaves, feature))     # reads it
        >>> torch.equal(p.unflatten(outputs), net(x)), torch.equal(shallow, net(x))
        (True, True)
    """
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise ValueError(f"branch={branch!r} is out of range: branches are numbered from 0 (the shallowest skip)")
    kwargs = dict(kwargs or {})
    _, signature = flatten_call(model, tuple(args), kwargs)
    with fx_sources() as sources:
        captured = capture(model, tuple(args), kwargs)
        merges = find_skip_merges(captured.gm)
        select_branch(merges, branch, model)
        built = _build(captured, merges, branch, signature)
    return dataclasses.replace(built, fx_sources=tuple(sources))


def plan_branches(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> list[CachePlan]:
    """One :class:`CachePlan` per branch of ``model``, shallowest first, from one capture (for explain)."""
    kwargs = dict(kwargs or {})
    _, signature = flatten_call(model, tuple(args), kwargs)
    captured = capture(model, tuple(args), kwargs)
    merges = find_skip_merges(captured.gm)
    return [_build(captured, merges, i, signature) for i in range(len(merges))]
