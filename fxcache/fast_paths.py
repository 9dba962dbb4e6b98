"""Capture the fused fast paths that PyTorch's own modules take in eager.

``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` run a fused kernel in eager when they can
(eval mode, no gradient needed, self-attention, ...): ``aten._native_multi_head_attention`` and
``aten._transformer_encoder_layer_fwd``. Under ``torch.export`` they never do: the modules treat every trace as
"not eager" (``torch.compiler.is_exporting()``, and the torch-function modes export pushes make
``torch.overrides.has_torch_function`` true). The exported graph then computes the same attention through
other kernels, which rounds differently (3e-8 on the attention, 1e-5 to 1e-4 on a U-Net's output, depending on
the CPU), and a cut graph would no longer equal the model it came from.

:func:`eager_fast_paths` lets those two modules decide during a capture as they decide in eager, so the graph
holds the same fused op eager runs, bit for bit. Only their own checks are answered as in eager, only on the
capturing thread, and only while the context is open; every other caller gets PyTorch's own answer. The modules'
other conditions (training, grad mode and ``requires_grad``, masks, dtypes, ``torch.backends.mha``) still apply
as written, which is why a capture runs under the caller's grad mode (:class:`fxcache.capture.Signature`).
``nn.TransformerEncoder``'s nested-tensor path (a padding mask in eval without gradients) has no graph form
(export skips it, and the padded positions would differ): capturing a call that takes it raises
:class:`~fxcache.errors.CaptureError` rather than computing something else.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.modules.activation as _activation
from torch._subclasses.fake_tensor import FakeTensor

from fxcache.errors import CaptureError

__all__ = ["eager_fast_paths"]

# The modules whose fast-path checks are answered as in eager (callers of torch.overrides.has_torch_function).
_FAST_PATH_MODULES = frozenset({"torch.nn.modules.activation", "torch.nn.modules.transformer"})

_local = threading.local()  # .depth: open eager_fast_paths() contexts on this thread
_install_lock = threading.Lock()
_installed = 0  # open contexts in the process (the patches stay while any is open)
_original_is_tracing = _activation._is_make_fx_tracing
_original_has_torch_function = torch.overrides.has_torch_function


def _on() -> bool:
    return getattr(_local, "depth", 0) > 0


def _is_make_fx_tracing() -> bool:
    return False if _on() else _original_is_tracing()


def _plain(x: Any) -> bool:
    # In eager these are tensors without a __torch_function__ of their own; a capture sees them as FakeTensors.
    return not isinstance(x, torch.Tensor) or isinstance(x, FakeTensor) or type(x) in (torch.Tensor, torch.nn.Parameter)


def _has_torch_function(args: Any) -> bool:
    if _on() and sys._getframe(1).f_globals.get("__name__") in _FAST_PATH_MODULES:
        # As eager would answer for the user's tensors: export's own torch-function modes do not count.
        return not all(_plain(x) for x in args)
    return _original_has_torch_function(args)


def _refuse_nested_path(encoder: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    # A forward pre-hook, on nn.TransformerEncoder during a capture only. Its nested-tensor check runs only in
    # eager (it is skipped whenever torch.compiler.is_compiling()); these are its conditions that do not need
    # the mask's values, so a right-aligned mask is refused too.
    src = args[0] if args else kwargs.get("src")
    mask = args[2] if len(args) > 2 else kwargs.get("src_key_padding_mask")
    other = args[1] if len(args) > 1 else kwargs.get("mask")
    params = list(encoder.layers[0].parameters())
    if (
        mask is None
        or other is not None
        or not getattr(encoder, "use_nested_tensor", False)
        or encoder.layers[0].training
        or not torch.backends.mha.get_fastpath_enabled()
        or torch.is_autocast_enabled()
        or not isinstance(src, torch.Tensor)
        or src.dim() != 3
        or (torch.is_grad_enabled() and any(t.requires_grad for t in [src, *params]))
    ):
        return
    raise CaptureError(
        f"{type(encoder).__name__} would run its nested-tensor fast path here in eager (eval mode, no gradients, a "
        "src_key_padding_mask): padded positions come out as zeros, which no captured graph reproduces. Build it "
        "with enable_nested_tensor=False (or call with gradients enabled) and fxcache captures exactly what eager "
        "runs. Your model was not modified."
    )


@contextmanager
def eager_fast_paths(model: torch.nn.Module | None = None) -> Iterator[None]:
    """While open, PyTorch modules with an eager fast path take it when traced on this thread as in eager.

    With ``model`` given, a call that would take ``nn.TransformerEncoder``'s nested-tensor path in eager raises
    :class:`~fxcache.errors.CaptureError` when traced.

    Example:
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> class Attend(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.mha = mha
        ...     def forward(self, x):
        ...         return self.mha(x, x, x, need_weights=False)[0]
        >>> x = torch.randn(2, 4, 8)
        >>> with torch.no_grad(), eager_fast_paths():
        ...     ep = torch.export.export(Attend(), (x,), strict=False)
        >>> [n.target.__name__ for n in ep.graph.nodes if n.op == "call_function"][0]
        '_native_multi_head_attention.default'
        >>> with torch.no_grad():
        ...     torch.equal(ep.module()(x), mha(x, x, x, need_weights=False)[0])
        True
    """
    global _installed
    encoders = [m for m in model.modules() if isinstance(m, torch.nn.TransformerEncoder)] if model is not None else []
    hooks = [m.register_forward_pre_hook(_refuse_nested_path, with_kwargs=True) for m in encoders]
    with _install_lock:
        if _installed == 0:
            _activation._is_make_fx_tracing = _is_make_fx_tracing
            torch.overrides.has_torch_function = _has_torch_function
        _installed += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _install_lock:
            _installed -= 1
            if _installed == 0:
                _activation._is_make_fx_tracing = _original_is_tracing
                torch.overrides.has_torch_function = _original_has_torch_function
        for hook in hooks:
            hook.remove()
