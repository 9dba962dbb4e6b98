"""Exceptions raised by fxcache."""

from __future__ import annotations

__all__ = ["CaptureError", "add_note"]


class CaptureError(RuntimeError):
    """The model could not be captured as one torch.fx graph.

    The message says why and what to try; the exception raised by the capture itself is chained
    (``raise CaptureError(...) from exc``), so the traceback still shows where tracing stopped.

    Example:
        >>> import torch, fxcache
        >>> class Branchy(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x   # data-dependent Python control flow
        >>> try:
        ...     fxcache.explain(Branchy(), torch.ones(1, 1, 4, 4))
        ... except fxcache.CaptureError as e:
        ...     print("captured: no")
        captured: no
    """


def add_note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` where Python supports it (3.11+: printed under the traceback); else do nothing."""
    if hasattr(error, "add_note"):
        error.add_note(note)
