"""One process-wide gate between tracing and running.

``torch.export.export(strict=False)``, which captures a model, sets process-wide state while it traces (the
"exporting" flag, patched module calls): model code running meanwhile in another thread is traced into the
capture or refused. So fxcache's captures pass the gate alone (:meth:`Gate.exclusive`) and its graph runs pass it
together (:meth:`Gate.shared`): a thread that reaches a graph while another thread captures waits for the capture,
and a capture waits for the runs in flight. A waiting capture goes first (runs arriving after it wait), so steps
in a busy server cannot starve it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TRACING", "Gate"]


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

