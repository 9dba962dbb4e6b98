"""One process-wide gate between tracing and running.

``torch.export.export(strict=False)``, which captures a model, sets process-wide state while it traces (the
"exporting" flag, patched module calls): model code running meanwhile in another thread is traced into the
capture or refused. So fxcache's captures pass the gate alone (:meth:`Gate.exclusive`) and its graph runs pass it
together (:meth:`Gate.shared`): a thread that reaches a graph while another thread captures waits for the capture,
and a capture waits for the runs in flight. A waiting capture goes first (runs arriving after it wait), so steps
in a busy server cannot starve it.
"""

from __future__ import annotations

import linecache
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx

__all__ = ["TRACING", "Gate", "fx_sources", "forget_fx_sources"]


class Gate:
    """A readers-writer lock that prefers the writer. Not re-entrant.

    Example:
        >>> gate = Gate()
        >>> with gate.shared(), gate.shared():   # runs share it (from one thread or many)
        ...     pass
        >>> with gate.exclusive():               # a capture has it alone
        ...     pass
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._running = 0  # graph runs inside
        self._tracing = False  # a capture inside
        self._waiting = 0  # captures waiting to enter

    def enter_shared(self) -> None:
        with self._cond:
            while self._tracing or self._waiting:
                self._cond.wait()
            self._running += 1

    def leave_shared(self) -> None:
        with self._cond:
            self._running -= 1
            if not self._running:
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.enter_shared()
        try:
            yield
        finally:
            self.leave_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._tracing or self._running:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


TRACING = Gate()  # fxcache's captures (exclusive) against its graph runs (shared), in this process


# torch.fx keeps the generated source of every GraphModule it ever made, in a process-wide cache and in
# linecache (for tracebacks), and never drops it: a capture of the demo U-Net leaves about 0.7 MB of source
# there (16 GraphModules, most of them torch.export's own). A server that captures new shapes as old ones
# are evicted would grow without bound, so fxcache notes which sources a plan made and forgets them with it.


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
