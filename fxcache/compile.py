"""How fxcache compiles its two graphs: the ``compile=`` option of :func:`fxcache.transform`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "CompileSpec",
    "check_compile_spec",
    "compile_graph",
    "compile_options",
    "dynamo_config",
    "own_cudagraphs",
    "skip_frame",
    "uses_cudagraphs",
]

CompileSpec = bool | str | Mapping[str, Any] | None

# torch.compile's own keyword arguments, minus the model.
_COMPILE_KWARGS = frozenset({"fullgraph", "dynamic", "backend", "mode", "options", "disable"})
# fxcache's own: {"cudagraphs": True} records each compiled graph as fxcache's own CUDA graph (see cudagraphs.py).
_FXCACHE_KWARGS = frozenset({"cudagraphs"})

# Inductor options that torch.compile(options=...) sets too late: Dynamo reads them from the global
# config while it traces, before the options are applied, so on their own they do nothing. Freezing is
# one (torch 2.13): Dynamo decides then whether the weights become constants.
_READ_BY_DYNAMO = ("freezing",)


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
        unknown = sorted(set(spec) - _COMPILE_KWARGS - _FXCACHE_KWARGS)
        if unknown:
            raise ValueError(
                f"compile={dict(spec)!r} has keys torch.compile does not take: {', '.join(unknown)}. "
                f"Allowed: {', '.join(sorted(_COMPILE_KWARGS | _FXCACHE_KWARGS))}"
            )
        if spec.get("cudagraphs", False) and _tree_cudagraphs(spec):
            raise ValueError(
                f"compile={dict(spec)!r} asks for CUDA graphs twice: fxcache's own (cudagraphs=True) and "
                "Inductor's CUDA graph trees (its mode); drop one"
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

    ``True`` picks the default mode per device: ``"reduce-overhead"`` (Inductor's CUDA graph trees) on
    CUDA, the default Inductor mode elsewhere. Graphs are always static-shaped and whole
    (``dynamic=False, fullgraph=True``) unless the dict says otherwise. fxcache's own keys
    (``cudagraphs``, see :func:`own_cudagraphs`) are not passed on to torch.compile.

    Example:
        >>> compile_options(True, torch.device("cuda"))
        {'fullgraph': True, 'dynamic': False, 'mode': 'reduce-overhead'}
        >>> compile_options({"mode": "max-autotune-no-cudagraphs", "cudagraphs": True}, torch.device("cuda"))
        {'mode': 'max-autotune-no-cudagraphs', 'fullgraph': True, 'dynamic': False}
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
        opts = {k: v for k, v in spec.items() if k not in _FXCACHE_KWARGS}
    opts.setdefault("fullgraph", True)
    opts.setdefault("dynamic", False)
    if device.type == "cuda" and not own_cudagraphs(spec, device) and "mode" not in opts and "options" not in opts:
        opts["mode"] = "reduce-overhead"
    return opts


def own_cudagraphs(spec: CompileSpec, device: torch.device) -> bool:
    """Whether fxcache records its compiled graphs as its own CUDA graphs (:mod:`fxcache.cudagraphs`).

    Opt-in with ``compile={"cudagraphs": True}`` (plus any torch.compile arguments without CUDA graphs of
    their own). Not yet run on a GPU: ``compile=True`` keeps Inductor's CUDA graph trees, which were.

    Example:
        >>> own_cudagraphs({"cudagraphs": True}, torch.device("cuda")), own_cudagraphs(True, torch.device("cuda"))
        (True, False)
        >>> own_cudagraphs({"cudagraphs": True}, torch.device("cpu"))
        False
    """
    return device.type == "cuda" and isinstance(spec, Mapping) and bool(spec.get("cudagraphs", False))


def _tree_cudagraphs(opts: Mapping[str, Any]) -> bool:
    if opts.get("backend", "inductor") != "inductor":
        return False
    if (opts.get("options") or {}).get("triton.cudagraphs"):
        return True
    return opts.get("mode") in ("reduce-overhead", "max-autotune")


def dynamo_config(opts: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Inductor config to set globally around the calls of a graph compiled with ``opts``.

    ``options={"freezing": True}`` asks Inductor to treat the weights as constants (on CPU: oneDNN
    convolutions and MKL linears on pre-packed weights). Passed to torch.compile it is ignored, because
    Dynamo reads ``torch._inductor.config.freezing`` before the options apply; fxcache sets it around
    each call of its graphs instead (about 20 us a call), so the first call, and any recompile, freezes.

    Example:
        >>> dynamo_config({"options": {"freezing": True}})
        {'freezing': True}
        >>> dynamo_config({"mode": "reduce-overhead"})
        {}
    """
    options = (opts or {}).get("options") or {}
    return {k: options[k] for k in _READ_BY_DYNAMO if k in options}


def uses_cudagraphs(opts: Mapping[str, Any] | None, device: torch.device) -> bool:
    """Whether graphs compiled with ``opts`` replay as Inductor's CUDA graph trees on ``device``."""
    return bool(opts) and device.type == "cuda" and _tree_cudagraphs(opts)


class _WithInductorConfig:
    """A compiled graph whose calls run with some Inductor config set globally (see :func:`dynamo_config`)."""

    def __init__(self, fn: Callable[..., Any], config: dict[str, Any]) -> None:
        import torch._inductor.config

        self.fn, self.config, self._patch = fn, config, torch._inductor.config.patch

    def __call__(self, *args: Any) -> Any:
        with self._patch(self.config):
            return self.fn(*args)


def compile_graph(gm: torch.nn.Module, opts: Mapping[str, Any]) -> Callable[..., Any]:
    """``torch.compile(gm, **opts)``, with the options Dynamo reads early made to take effect."""
    compiled = torch.compile(gm, **opts)
    config = dynamo_config(opts)
    return _WithInductorConfig(compiled, config) if config else compiled


def skip_frame(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Dynamo skips ``fn``'s own frame and compiles the frames it calls, as ``torch._dynamo.disable(fn,
    recursive=False)`` does, but without refusing to run while another thread exports a model (that wrapper
    checks the process-wide exporting flag; fxcache's own gate makes a call wait for a capture instead).

    fxcache's Python between the graphs (the step logic, the feature's bookkeeping) runs as plain Python under a
    user's ``torch.compile``, which then compiles each graph it calls once."""
    skip = getattr(getattr(torch._dynamo, "decorators", None), "skip", None)
    return skip(fn) if skip is not None else torch._dynamo.disable(fn, recursive=False)
