"""Backends: turn a :class:`~fxcache.plan.CachePlan` into the two callables the runtime calls.

Each backend is a function ``plan -> Graphs(full, shallow, cudagraphs)``. ``eager`` runs the plan's
GraphModules as they are; ``inductor`` puts each through ``torch.compile``. Both keep the plan's
cache buffer: the compiled graphs write and read the same tensor. ``aot_inductor`` is the
ahead-of-time target (:func:`fxcache.load`): two AOTInductor runners from a package, whose graphs take
and return the cache explicitly (a packaged graph folds attribute tensors into constants), wrapped so
that they keep the same contract: the full callable writes the deep feature, the shallow one reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from fxcache.compile import CompileSpec, compile_graph, compile_options, own_cudagraphs, uses_cudagraphs
from fxcache.generations import CellSlot, Slot
from fxcache.plan import CachePlan

__all__ = ["Graphs", "aot_inductor", "eager", "for_spec", "inductor", "own_cuda_graphs"]


class Graphs(NamedTuple):
    """The callables for one plan: ``full(*leaves)`` and ``shallow(*leaves)`` return flat outputs."""

    full: Callable[..., Any]
    shallow: Callable[..., Any]
    cudagraphs: bool = False  # True: outputs are overwritten by the next replay (the runtime clones them)
    slot: Slot | None = None  # where the graphs keep the deep feature; None: the plan's cache buffer


def eager(plan: CachePlan) -> Graphs:
    """The plan's own GraphModules, run by PyTorch's eager kernels (the exact path).

    Example:
        >>> import torch, fxcache
        >>> from fxcache.backends import eager
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, stride=2, padding=1), torch.nn.Upsample(scale_factor=2))
        >>> class Skip(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.body = net
        ...     def forward(self, x):
        ...         return x + self.body(x)
        >>> p = fxcache.plan(Skip(), (torch.randn(1, 2, 4, 4),))
        >>> eager(p).full is p.full
        True
    """
    return Graphs(plan.full, plan.shallow, cudagraphs=False)


def inductor(plan: CachePlan, opts: Mapping[str, Any]) -> Graphs:
    """Each graph through ``torch.compile(gm, **opts)`` (see :func:`fxcache.compile.compile_options`).

    Graphs compile at their first call. ``cudagraphs`` says whether they replay as CUDA graphs.
    """
    return Graphs(
        compile_graph(plan.full, opts),
        compile_graph(plan.shallow, opts),
        cudagraphs=uses_cudagraphs(opts, plan.cache_spec.device),
    )


class _AOTGraph:
    """One packaged graph called with the runtime's leaves: only the tensor leaves go to the runner."""

    def __init__(
        self, run: Callable[[list[Any]], list[Any]], tensor_leaves: tuple[int, ...], cache: list[Any], full: bool
    ):
        self.run, self.tensor_leaves, self.cache, self.full = run, tensor_leaves, cache, full

    def __call__(self, *leaves: Any) -> list[Any]:
        tensors = [leaves[i] for i in self.tensor_leaves]
        if self.full:
            *outputs, deep = self.run(tensors)
            self.cache[0] = deep  # the latest full step's deep feature: the shallow graph's last input
            return outputs
        return self.run([*tensors, self.cache[0]])


def aot_inductor(
    full: Callable[[list[Any]], list[Any]],
    shallow: Callable[[list[Any]], list[Any]],
    tensor_leaves: tuple[int, ...],
) -> Graphs:
    """Two ahead-of-time compiled graphs, ``full(tensors) -> [*outputs, deep]`` and
    ``shallow([*tensors, deep]) -> outputs``, as the runtime's ``Graphs``.

    The cache is held here, between the calls, as the tensor the last full call returned (no copy):
    ``Graphs.full(*leaves)`` keeps it and ``Graphs.shallow(*leaves)`` passes it. ``tensor_leaves`` are
    the positions of the tensor leaves in a call's leaves (the others are constants of the graphs).

    Example:
        >>> g = aot_inductor(lambda ts: [ts[0] + 1, ts[0] * 2], lambda ts: [ts[0] + ts[1]], (0,))
        >>> g.full(3, None), g.shallow(10, None)   # the full call cached 6; the shallow one read it
        ([4], [16])
    """
    cache: list[Any] = [None]
    return Graphs(
        _AOTGraph(full, tensor_leaves, cache, True),
        _AOTGraph(shallow, tensor_leaves, cache, False),
        slot=CellSlot(cache),
    )


def own_cuda_graphs(graphs: Graphs) -> Graphs:
    """``graphs`` (compiled without CUDA graphs) recorded and replayed as fxcache's own CUDA graphs.

    One memory pool serves the plan's two graphs; the runners clone their outputs themselves.
    """
    import torch

    from fxcache.cudagraphs import CUDAGraphRunner

    pool = torch.cuda.graph_pool_handle()
    return Graphs(CUDAGraphRunner(graphs.full, pool), CUDAGraphRunner(graphs.shallow, pool), cudagraphs=False)


def for_spec(plan: CachePlan, spec: CompileSpec) -> Graphs:
    """The backend a ``compile=`` setting selects: eager for ``False``/``None``, else Inductor, with
    fxcache's own CUDA graphs on top for ``{"cudagraphs": True}`` on CUDA."""
    device = plan.cache_spec.device
    opts = compile_options(spec, device)
    if opts is None:
        return eager(plan)
    graphs = inductor(plan, opts)
    return own_cuda_graphs(graphs) if own_cudagraphs(spec, device) else graphs
