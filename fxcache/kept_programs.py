"""Programs that outlive a module: each model's plans and compiled graphs, kept weakly per model.

Capturing (and compiling) is the expensive part of a first call: seconds on CPU for an SD-sized U-Net, and a
compile on a GPU. ``fxcache.enable(pipe)`` after ``fxcache.disable(pipe)``, or a second
``fxcache.transform(model, ...)`` of the same model with the same settings, finds the programs the first module
built here instead of building them again.

A program is kept under the key the runtime uses (input signature, branch, compile setting) together with the
model fingerprint it was built under (:func:`fxcache.watch.fingerprint`); it is handed out only for the same
fingerprint, so a model changed since then is captured again. Programs live as long as their model (a weak key:
they hold the model's tensors, never the module) and at most as many per model as the last module that kept one
there allows (its ``max_plans``), least recently used dropped: no more than that module itself holds.
Generations of different modules can share a program safely: its slot belongs to no module
(:mod:`fxcache.generations`). A program dropped here is torn down by ``on_drop`` (its torch.fx sources
forgotten); a module still running it keeps working (only its tracebacks lose their source lines).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

__all__ = ["KeptPrograms"]

P = TypeVar("P")


class _ForModel(Generic[P]):
    def __init__(self) -> None:
        self.fingerprint: Hashable | None = None
        self.programs: OrderedDict[Hashable, P] = OrderedDict()


class KeptPrograms(Generic[P]):
    """Programs by model (weakly) and key, valid for one model fingerprint.

    Example:
        >>> kept = KeptPrograms()
        >>> model = torch.nn.Linear(2, 2)
        >>> kept.put(model, "key", "fingerprint-1", "program", limit=2)
        >>> kept.get(model, "key", "fingerprint-1"), kept.get(model, "key", "fingerprint-2")
        ('program', None)
        >>> kept.get(model, "key", "fingerprint-1") is None   # a new fingerprint dropped the old programs
        True
    """

    def __init__(self, on_drop: Callable[[P], None] | None = None) -> None:
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._models: weakref.WeakKeyDictionary[torch.nn.Module, _ForModel[P]] = weakref.WeakKeyDictionary()

    def get(self, model: torch.nn.Module, key: Hashable, fingerprint: Hashable) -> P | None:
        """The program kept for ``key`` if it was built for this fingerprint of ``model``, else None."""
        with self._lock:
            kept = self._models.get(model)
            if kept is None:
                return None
            if kept.fingerprint != fingerprint:  # the model changed: nothing kept for it can serve again
                self._drop(kept, list(kept.programs))
                return None
            program = kept.programs.get(key)
            if program is not None:
                kept.programs.move_to_end(key)
            return program

    def put(self, model: torch.nn.Module, key: Hashable, fingerprint: Hashable, program: P, limit: int) -> None:
        """Keep ``program`` for ``key``, built for this fingerprint of ``model``; keep at most ``limit`` for it."""
        with self._lock:
            kept = self._models.get(model)
            if kept is None:
                kept = self._models[model] = _ForModel()
            if kept.fingerprint != fingerprint:
                self._drop(kept, list(kept.programs))
                kept.fingerprint = fingerprint
            kept.programs[key] = program
            kept.programs.move_to_end(key)
            self._drop(kept, list(kept.programs)[: max(0, len(kept.programs) - limit)])

    def holds(self, model: torch.nn.Module, match: Callable[[P], bool]) -> bool:
        """Whether a program ``match`` accepts is kept for ``model`` (a module must then not tear it down)."""
        with self._lock:
            kept = self._models.get(model)
            return kept is not None and any(match(p) for p in kept.programs.values())

    def forget(self, model: torch.nn.Module) -> None:
        """Drop everything kept for ``model`` (it changed in a way fingerprints do not see, or moved)."""
        with self._lock:
            kept = self._models.pop(model, None)
            if kept is not None:
                self._drop(kept, list(kept.programs))

    def _drop(self, kept: _ForModel[P], keys: list[Hashable]) -> None:
        for key in keys:
            program = kept.programs.pop(key)
            if self._on_drop is not None:
                self._on_drop(program)
