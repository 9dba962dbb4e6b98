"""Noticing that a wrapped model changed since its graphs were captured.

A captured graph is bound to the model as it was: its modules' code, the parameter and buffer
objects, the hooks that ran, the attention processors and adapter switches read during tracing.
:func:`fingerprint` sums that up in one comparable value; the runtime takes it at the start of each
generation (not at each step) and captures again when it differs.

What it sees: the module tree (a submodule added, removed or replaced, as peft's ``add_adapter``
does), each parameter and buffer *object* (``load_state_dict(..., assign=True)``, a replaced
``nn.Parameter``), forward hooks and pre-hooks (per module and global), ``training`` flags,
diffusers' attention processors (``set_attn_processor``), peft's adapter switches
(``set_adapter``, ``disable_adapters``, merges, scaling) and FreeU's factors. With
``versions=True`` also each tensor's version counter, which every in-place update bumps (needed only
by graphs that baked the weights in: Inductor's freezing). What it does not see: other Python
attributes a forward reads (a plain ``self.scale = 2.0``) and in-place changes to tensors that are
neither parameters nor buffers; say so with ``CachedModule.drop_graphs()``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch.nn.modules import module as _module

__all__ = ["fingerprint"]

# Plain attributes that change what a traced forward computes: diffusers' attention processor,
# peft's adapter switches, FreeU's factors (set on up blocks by enable_freeu).
_SWITCHES = (
    "processor",
    "_active_adapter",
    "_disable_adapters",
    "merged_adapters",
    "scaling",
    "b1",
    "b2",
    "s1",
    "s2",
)


def _frozen(value: Any) -> Hashable:
    # Scalars and small containers of them compare by value; anything else (a processor object) by identity.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((str(k), _frozen(v)) for k, v in value.items()))
    return ("id", id(value))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot be updated in place outside)
        return -1


def fingerprint(model: torch.nn.Module, versions: bool = False) -> Hashable:
    """A value that changes when ``model`` changes in a way a captured graph would not follow.

    Walks every module once (about a millisecond per thousand modules).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> before = fingerprint(lin)
        >>> lin.weight = torch.nn.Parameter(lin.weight.detach().clone())
        >>> fingerprint(lin) == before
        False
    """
    # One flat list, in module order: identities, flags and hook keys (hooks only where present).
    parts: list[Hashable] = [tuple(_module._global_forward_hooks), tuple(_module._global_forward_pre_hooks)]
    add = parts.append
    stack = [model]
    while stack:  # depth first, children in order (faster than model.modules(), which builds names)
        m = stack.pop()
        attrs = m.__dict__
        stack.extend(reversed([c for c in attrs["_modules"].values() if c is not None]))
        add(id(m))
        add(attrs["training"])
        hooks, pre_hooks = attrs["_forward_hooks"], attrs["_forward_pre_hooks"]
        if hooks or pre_hooks:
            add(("hooks", tuple(hooks), tuple(pre_hooks)))
        for p in attrs["_parameters"].values():
            add(id(p))
            if versions and p is not None:
                add(_version(p))
        for b in attrs["_buffers"].values():
            add(id(b))
            if versions and b is not None:
                add(_version(b))
        for key in _SWITCHES:
            if key in attrs:
                add((key, _frozen(attrs[key])))
    return tuple(parts)
