"""Stage 4: run the full and shallow graphs on DeepCache's schedule.

Which graph runs is decided here, in plain Python between the graphs, never inside them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxcache.capture import Captured, Signature, capture, flatten_call, rebind
from fxcache.config import CacheConfig
from fxcache.passes import SkipMerge, find_skip_merges, split_at_branch

__all__ = ["CachedModule", "CacheState", "StepSource", "select_branch"]

# Supplies (new_generation, step) for the next call, or None to fall back to the module's own rule.
StepSource = Callable[[], "tuple[bool, int] | None"]


@dataclass
class CacheState:
    """Everything that changes from step to step. ``reset()`` starts a new generation."""

    step: int = -1  # index of the last call in the current generation; -1: no call yet
    last_timestep: float | None = None
    signature: Signature | None = None  # what the cached feature was computed for
    cache: torch.Tensor | None = None
    full_steps: int = 0  # counters, for tests and explain-style reporting
    shallow_steps: int = 0

    def reset(self) -> None:
        self.step, self.last_timestep, self.signature, self.cache = -1, None, None, None


@dataclass
class _Program:
    """The graphs for one input signature."""

    captured: Captured
    merge: SkipMerge
    full: fx.GraphModule
    shallow: fx.GraphModule
    graphs: tuple[fx.GraphModule, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.graphs = (self.full, self.shallow)


def select_branch(merges: list[SkipMerge], branch: int, model: torch.nn.Module) -> SkipMerge:
    """The merge for ``branch``, or a ValueError that says what the model has.

    Example:
        >>> select_branch([], 0, torch.nn.Identity())
        Traceback (most recent call last):
        ...
        ValueError: no skip connection was found in Identity: ...
    """
    name = type(model).__name__
    if not merges:
        raise ValueError(
            f"no skip connection was found in {name}: fxcache looks for a concatenation of a tensor with "
            "one computed from it, or an addition of a tensor with one computed from it through lower "
            "resolution (a U-Net's long skips). DeepCache needs such a skip to cut the network; this model "
            "has none, so it cannot be cached. The model was not modified."
        )
    if branch >= len(merges):
        raise ValueError(
            f"branch={branch} is out of range: this model has {len(merges)} skip connections "
            f"(0..{len(merges) - 1}). Run fxcache.explain(model, *inputs) to see them. The model was not modified."
        )
    return merges[branch]


def _number_leaves(sig: Signature) -> list[int]:
    return [i for i, d in enumerate(sig.leaves) if d[0] == "const" and d[1] in (int, float)]


def _warn_if_number_changed(sig: Signature, known: dict[Signature, _Program]) -> None:
    # A Python number is baked into the captured graph; one that changes every step (a timestep
    # passed as an int) would mean a capture per step. Say so once it happens.
    numbers = _number_leaves(sig)
    for other in known:
        if other.spec == sig.spec and numbers and _number_leaves(other) == numbers:
            differ = [i for i in numbers if other.leaves[i] != sig.leaves[i]]
            rest = [i for i in range(len(sig.leaves)) if i not in differ]
            if differ and all(other.leaves[i] == sig.leaves[i] for i in rest):
                warnings.warn(
                    "fxcache captures the model again because a Python number argument changed "
                    f"(argument leaf {differ[0]}: {other.leaves[differ[0]][2]!r} -> {sig.leaves[differ[0]][2]!r}). "
                    "Numbers are constants in the captured graph; pass values that change between calls, "
                    "such as the timestep, as tensors (torch.tensor(t)) so one capture serves every step.",
                    stacklevel=4,
                )
                return


def _timestep_value(args: tuple, kwargs: dict[str, Any]) -> float | None:
    # The diffusion convention: the timestep is the second positional argument or `timestep=`.
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor) and t.numel() > 0 and not t.is_complex():
        return float(t.reshape(-1)[0])  # a host read; fxcache.enable(pipe) avoids it
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


class CachedModule(torch.nn.Module):
    """A model that runs DeepCache: full steps on schedule, shallow steps in between.

    Made by :func:`fxcache.transform`. It holds the user's model as ``.model`` (weights shared, never
    copied) and forwards every attribute it does not have to it, so ``.config``, ``.dtype`` and
    friends behave as on the original. Call :meth:`reset` to start a new generation by hand.
    """

    def __init__(self, model: torch.nn.Module, config: CacheConfig) -> None:
        super().__init__()
        self.model = model
        self.fxcache_config = config
        self.fxcache_state = CacheState()
        self.step_source: StepSource | None = None
        self._programs: dict[Signature, _Program] = {}

    # -- behaving like the wrapped model -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        return getattr(self.model, name)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CachedModule:
        super()._apply(fn, *args, **kwargs)
        # .to()/.half() may replace buffer objects: point the graphs at the model's tensors again,
        # and drop a cache computed on the old device or dtype.
        for program in self._programs.values():
            for gm in program.graphs:
                rebind(gm, program.captured.attr_fqns, self.model)
        self.fxcache_state.reset()
        return self

    def extra_repr(self) -> str:
        c = self.fxcache_config
        return f"branch={c.branch}, interval={c.interval}"

    # -- the step logic ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache; the next call starts a new generation and runs in full."""
        self.fxcache_state.reset()

    def _program(self, sig: Signature, args: tuple, kwargs: dict[str, Any]) -> _Program:
        program = self._programs.get(sig)
        if program is None:
            _warn_if_number_changed(sig, self._programs)
            captured = capture(self.model, args, kwargs)
            merge = select_branch(find_skip_merges(captured.gm), self.fxcache_config.branch, self.model)
            full, shallow = split_at_branch(captured.gm, merge)
            program = self._programs[sig] = _Program(captured, merge, full, shallow)
        return program

    def _next_step(self, sig: Signature, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Advance the state by one call; True when this call must run in full."""
        st = self.fxcache_state
        new_generation = st.step < 0 or st.signature != sig or st.cache is None
        external = self.step_source() if self.step_source is not None else None
        if external is not None:
            ext_new, step = external
            new_generation = new_generation or ext_new
        else:
            t = _timestep_value(args, kwargs)
            if t is not None and st.last_timestep is not None and t > st.last_timestep:
                new_generation = True  # timesteps fall within a generation; a rise means a new one
            st.last_timestep = t
            step = 0 if new_generation else st.step + 1
        st.step = step
        return new_generation or self.fxcache_config.schedule.is_full(step)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, sig = flatten_call(self.model, args, kwargs)
        program = self._program(sig, args, kwargs)
        st = self.fxcache_state
        if self._next_step(sig, args, kwargs):
            *outputs, st.cache = program.full(*leaves)
            st.signature = sig
            st.full_steps += 1
        else:
            outputs = program.shallow(*leaves, st.cache)
            st.shallow_steps += 1
        return program.captured.unflatten(outputs)
