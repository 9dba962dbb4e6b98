"""Backends: turn a :class:`~fxcache.plan.CachePlan` into the two callables the runtime calls.

Each backend is a function ``plan -> Graphs(full, shallow, cudagraphs)``. ``eager`` runs the plan's
GraphModules as they are; ``inductor`` puts each through ``torch.compile``. Both keep the plan's
cache buffer: the compiled graphs write and read the same tensor. An ahead-of-time backend would
join here with the same signature (it would need the cache as an explicit input and output: a
packaged graph folds attribute tensors into constants).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from fxcache.compile import CompileSpec, compile_graph, compile_options, own_cudagraphs, uses_cudagraphs
from fxcache.plan import CachePlan

__all__ = ["Graphs", "eager", "for_spec", "inductor", "own_cuda_graphs"]


class Graphs(NamedTuple):
    """The callables for one plan: ``full(*leaves)`` and ``shallow(*leaves)`` return flat outputs."""

    full: Callable[..., Any]
    shallow: Callable[..., Any]
    cudagraphs: bool = False  # True: outputs are overwritten by the next replay (the runtime clones them)


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
