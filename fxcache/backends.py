"""Backends: turn a :class:`~fxcache.plan.CachePlan` into the two callables the runtime calls, and decide where the
cached feature lives between them (a :class:`~fxcache.generations.Slot`).

A plan's graphs take and return the feature explicitly (``full -> (*outputs, *features)``,
``shallow(*leaves, *features)``). Each backend is a function ``plan -> Graphs(full, shallow, slot, cudagraphs)``
whose callables take just the call's leaves:

* ``eager`` runs the plan's GraphModules as they are and keeps each feature as the tensor the full graph returned
  (a :class:`~fxcache.generations.CellSlot`: no copy);
* ``inductor`` binds one buffer into both graphs (the full graph writes it in place, the shallow one reads it: a
  fixed address, which CUDA graphs need; a :class:`~fxcache.generations.BufferSlot`) and compiles each;
* ``aot_inductor`` wraps two runners from an ahead-of-time package (:func:`fxcache.load`), whose graphs are the
  plan's explicit ones, like ``eager``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from fxcache.compile import CompileSpec, compile_graph, compile_options, own_cudagraphs, skip_frame, uses_cudagraphs
from fxcache.generations import BufferSlot, CellSlot, Slot
from fxcache.passes import bind_cache_buffer
from fxcache.plan import CachePlan

__all__ = ["Graphs", "aot_inductor", "bound", "eager", "explicit", "for_spec", "inductor", "own_cuda_graphs"]


class Graphs(NamedTuple):
    """The callables for one plan: ``full(*leaves)`` and ``shallow(*leaves)`` return flat outputs; between them the
    feature lives in ``slot``."""

    full: Callable[..., Any]
    shallow: Callable[..., Any]
    slot: Slot  # where the full callable leaves the feature and the shallow one finds it
    cudagraphs: bool = False  # True: outputs are overwritten by the next replay (the runtime clones them)


class _CellGraph:
    """One of a plan's explicit-feature graphs, called with a call's leaves: the full one keeps the features it
    returns in ``cell`` (by reference), the shallow one is handed them after the leaves."""

    def __init__(self, run: Callable[..., Any], cell: list[Any], n_features: int, full: bool) -> None:
        self.run, self.cell, self.n, self.full = run, cell, n_features, full

    @skip_frame  # under a user's torch.compile: plain Python here, each graph it calls compiled once
    def __call__(self, *leaves: Any) -> Any:
        if self.full:
            out = list(self.run(*leaves))
            features = out[len(out) - self.n :]  # the latest full step's: one tensor, or a tuple of several
            self.cell[0] = features[0] if self.n == 1 else tuple(features)
            return out[: len(out) - self.n]
        held = self.cell[0]
        return self.run(*leaves, *(held if self.n != 1 else (held,)))


def explicit(full: Callable[..., Any], shallow: Callable[..., Any], n_features: int = 1) -> Graphs:
    """Graphs from ``full(*leaves) -> (*outputs, *features)`` and ``shallow(*leaves, *features) -> outputs``: the
    features are kept as the tensors the full call returned (no copy, no buffer) in a :class:`CellSlot`.

    Example:
        >>> g = explicit(lambda x: [x + 1, x * 2], lambda x, deep: [x + deep])
        >>> g.full(3), g.shallow(10)   # the full call kept 6; the shallow one read it
        ([4], [16])
    """
    cell: list[Any] = [None]
    return Graphs(_CellGraph(full, cell, n_features, True), _CellGraph(shallow, cell, n_features, False), CellSlot(cell))


def eager(plan: CachePlan) -> Graphs:
    """The plan's own GraphModules, run by PyTorch's eager kernels (the exact path). Each generation's feature is
    the tensor its last full step returned: nothing is copied, and interleaved generations swap references.

    Example:
        >>> import torch, fxcache
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, stride=2, padding=1), torch.nn.Upsample(scale_factor=2))
        >>> class Skip(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.body = net
        ...     def forward(self, x):
        ...         return x + self.body(x)
        >>> x = torch.randn(1, 2, 4, 4)
        >>> g = eager(fxcache.plan(Skip(), (x,)))
        >>> torch.equal(g.full(x)[0], g.shallow(x)[0])   # the shallow graph reads what the full one returned
        True
    """
    return explicit(plan.full, plan.shallow, len(plan.feature_specs))


def bound(plan: CachePlan) -> tuple[fx.GraphModule, fx.GraphModule, BufferSlot]:
    """The plan's graphs with its feature in one buffer bound into both (the full graph writes it in place, the
    shallow graph reads it): a fixed address, as CUDA graphs need. The buffer is allocated here, once, before any
    compile, and never reallocated."""
    if len(plan.feature_specs) != 1:
        raise NotImplementedError(
            f"compiled graphs keep one cached feature in a bound buffer; this plan caches {len(plan.feature_specs)}: "
            "run it with compile=False"
        )
    spec = plan.cache_spec
    # Never an inference tensor (a plan built under torch.inference_mode()): later full steps outside inference
    # mode write it in place.
    with torch.inference_mode(False):
        buffer = torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)
    full, shallow = bind_cache_buffer(plan.full, plan.shallow, buffer)
    return full, shallow, BufferSlot(buffer)


def inductor(plan: CachePlan, opts: Mapping[str, Any]) -> Graphs:
    """Each graph through ``torch.compile(gm, **opts)`` (see :func:`fxcache.compile.compile_options`), with the
    feature in a bound buffer (:func:`bound`). Graphs compile at their first call. ``cudagraphs`` says whether
    they replay as CUDA graphs.
    """
    full, shallow, slot = bound(plan)
    return Graphs(
        compile_graph(full, opts),
        compile_graph(shallow, opts),
        slot,
        cudagraphs=uses_cudagraphs(opts, plan.cache_spec.device),
    )


def aot_inductor(
    full: Callable[[list[Any]], list[Any]],
    shallow: Callable[[list[Any]], list[Any]],
    tensor_leaves: tuple[int, ...],
) -> Graphs:
    """Two ahead-of-time compiled graphs, ``full(tensors) -> [*outputs, deep]`` and
    ``shallow([*tensors, deep]) -> outputs``, as the runtime's ``Graphs``.

    The feature is held between the calls as the tensor the last full call returned (no copy), as :func:`explicit`
    does. ``tensor_leaves`` are the positions of the tensor leaves in a call's leaves (the others are constants of
    the graphs).

    Example:
        >>> g = aot_inductor(lambda ts: [ts[0] + 1, ts[0] * 2], lambda ts: [ts[0] + ts[1]], (0,))
        >>> g.full(3, None), g.shallow(10, None)   # the full call cached 6; the shallow one read it
        ([4], [16])
    """

    def run_full(*leaves: Any) -> list[Any]:
        return full([leaves[i] for i in tensor_leaves])

    def run_shallow(*leaves_and_feature: Any) -> list[Any]:
        *leaves, deep = leaves_and_feature
        return shallow([*(leaves[i] for i in tensor_leaves), deep])

    return explicit(run_full, run_shallow)


def own_cuda_graphs(graphs: Graphs) -> Graphs:
    """``graphs`` (compiled without CUDA graphs) recorded and replayed as fxcache's own CUDA graphs.

    One memory pool serves the plan's two graphs; the runners clone their outputs themselves.
    """
    from fxcache.cudagraphs import CUDAGraphRunner

    pool = torch.cuda.graph_pool_handle()
    return Graphs(CUDAGraphRunner(graphs.full, pool), CUDAGraphRunner(graphs.shallow, pool), graphs.slot)


def for_spec(plan: CachePlan, spec: CompileSpec) -> Graphs:
    """The backend a ``compile=`` setting selects: eager for ``False``/``None``, else Inductor, with
    fxcache's own CUDA graphs on top for ``{"cudagraphs": True}`` on CUDA."""
    device = plan.cache_spec.device
    opts = compile_options(spec, device)
    if opts is None:
        return eager(plan)
    graphs = inductor(plan, opts)
    return own_cuda_graphs(graphs) if own_cudagraphs(spec, device) else graphs
