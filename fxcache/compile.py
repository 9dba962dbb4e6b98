"""How fxcache compiles its two graphs: the ``compile=`` option of :func:`fxcache.transform`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CompileSpec", "check_compile_spec", "compile_options", "uses_cudagraphs"]

CompileSpec = bool | str | Mapping[str, Any] | None

# torch.compile's own keyword arguments, minus the model.
_COMPILE_KWARGS = frozenset({"fullgraph", "dynamic", "backend", "mode", "options", "disable"})


def _modes() -> list[str]:
    from torch._inductor import list_mode_options

    return sorted(list_mode_options())


def check_compile_spec(spec: CompileSpec) -> None:
    """Raise a ValueError/TypeError that says what ``compile=`` accepts, if ``spec`` is not that.

    Example:
        >>> check_compile_spec("max-autotune")
        >>> check_compile_spec({"mode": "reduce-overhead", "dynamic": False})
        >>> check_compile_spec("fastest")
        Traceback (most recent call last):
        ...
        ValueError: compile='fastest' is not a torch.compile mode; use one of ...
    """
    if spec is None or isinstance(spec, bool):
        return
    if isinstance(spec, str):
        if spec not in _modes():
            raise ValueError(f"compile={spec!r} is not a torch.compile mode; use one of {', '.join(_modes())}")
        return
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - _COMPILE_KWARGS)
        if unknown:
            raise ValueError(
                f"compile={dict(spec)!r} has keys torch.compile does not take: {', '.join(unknown)}. "
                f"Allowed: {', '.join(sorted(_COMPILE_KWARGS))}"
            )
        if "mode" in spec:
            check_compile_spec(spec["mode"])
        return
    raise TypeError(
        f"compile must be a bool, a torch.compile mode name or a dict of torch.compile arguments, "
        f"got {type(spec).__name__}"
    )


def compile_options(spec: CompileSpec, device: torch.device) -> dict[str, Any] | None:
    """The torch.compile keyword arguments for ``spec`` on ``device``; None means run eagerly.

    ``True`` picks the default mode per device: ``"reduce-overhead"`` (CUDA graphs) on CUDA, the
    default Inductor mode elsewhere. Graphs are always static-shaped and whole
    (``dynamic=False, fullgraph=True``) unless the dict says otherwise.

    Example:
        >>> compile_options(True, torch.device("cpu"))
        {'fullgraph': True, 'dynamic': False}
        >>> compile_options(True, torch.device("cuda"))["mode"]
        'reduce-overhead'
        >>> compile_options(False, torch.device("cuda")) is None
        True
    """
    if spec is None or spec is False:
        return None
    if spec is True:
        opts: dict[str, Any] = {}
    elif isinstance(spec, str):
        opts = {"mode": spec}
    else:
        opts = dict(spec)
    opts.setdefault("fullgraph", True)
    opts.setdefault("dynamic", False)
    if device.type == "cuda" and "mode" not in opts and "options" not in opts:
        opts["mode"] = "reduce-overhead"
    return opts


def uses_cudagraphs(opts: Mapping[str, Any] | None, device: torch.device) -> bool:
    """Whether graphs compiled with ``opts`` replay as CUDA graphs on ``device``."""
    if not opts or device.type != "cuda" or opts.get("backend", "inductor") != "inductor":
        return False
    if opts.get("options", {}).get("triton.cudagraphs"):
        return True
    return opts.get("mode") in ("reduce-overhead", "max-autotune")
