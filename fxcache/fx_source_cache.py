"""torch.fx's cache of generated sources, and how fxcache forgets the sources of a plan it drops.

torch.fx keeps the generated source of every GraphModule it ever made, in a process-wide cache and in
linecache (for tracebacks), and never drops it: a capture of the demo U-Net leaves about 0.7 MB of source
there (16 GraphModules, most of them torch.export's own). A server that captures new shapes as old ones are
evicted would grow without bound, so fxcache notes which sources a plan made (:func:`fx_sources`, around
:func:`fxcache.plan.plan`) and forgets them with it (:func:`forget_fx_sources`, when the runtime drops it).
"""

from __future__ import annotations

import linecache
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx

__all__ = ["forget_fx_sources", "fx_sources"]


def _fx_source_cache() -> dict[str, Any] | None:
    loader = getattr(getattr(torch.fx, "graph_module", None), "_loader", None)
    cache = getattr(loader, "eval_cache", None)
    return cache if isinstance(cache, dict) else None


@contextmanager
def fx_sources() -> Iterator[list[str]]:
    """Collect the keys of the GraphModule sources torch.fx caches inside the block (for :func:`forget_fx_sources`).

    Example:
        >>> with fx_sources() as keys:
        ...     gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> gm.forward.__code__.co_filename in keys
        True
    """
    cache = _fx_source_cache()
    before = set(cache) if cache is not None else set()
    keys: list[str] = []
    try:
        yield keys
    finally:
        if cache is not None:
            keys.extend(k for k in list(cache) if k not in before)


def forget_fx_sources(keys: Iterable[str]) -> None:
    """Drop these GraphModule sources from torch.fx's cache and linecache (their modules then show no source
    lines in tracebacks; call it for modules that are being dropped)."""
    cache = _fx_source_cache()
    for key in keys:
        if cache is not None:
            cache.pop(key, None)
        linecache.cache.pop(key, None)
