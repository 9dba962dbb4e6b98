"""Stage 4: run the full and shallow graphs on DeepCache's schedule.

Which graph runs is decided here, in plain Python between the graphs, never inside them. That
Python is kept out of Dynamo, so a user's ``torch.compile(cached)`` compiles the two graphs it calls
(once each per input signature) and never recompiles because a step counter moved.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fxcache import backends
from fxcache.backends import Graphs
from fxcache.capture import Signature, flatten_call
from fxcache.config import CacheConfig, check_total_steps
from fxcache.errors import CaptureError, add_note
from fxcache.plan import CachePlan, plan

__all__ = ["CachedModule", "CacheState", "StepInfo", "StepSource"]


class StepInfo(NamedTuple):
    """What a step source knows about the next call."""

    new_generation: bool
    step: int  # index within the generation, 0-based
    total: int | None  # steps in this generation, when known


# Supplies the StepInfo for the next call, or None to fall back to the module's own rule.
StepSource = Callable[[], "StepInfo | None"]


@dataclass
class CacheState:
    """Everything that changes from step to step. ``reset()`` starts a new generation."""

    step: int = -1  # index of the last call in the current generation; -1: no call yet
    last_timestep: float | None = None
    signature: Signature | None = None  # whose cache buffer holds a valid deep feature
    full_steps: int = 0  # cumulative counters over the module's life, for tests and reports
    shallow_steps: int = 0
    generation_full_steps: int = 0  # the same counts for the current (or last) generation only
    generation_shallow_steps: int = 0

    def reset(self) -> None:
        self.step, self.last_timestep, self.signature = -1, None, None
        self.generation_full_steps = self.generation_shallow_steps = 0


@dataclass
class _Entry:
    """A plan and the callables a backend made of it, for one (signature, branch, compile) key."""

    plan: CachePlan
    graphs: Graphs
    ran: set[bool] = field(default_factory=set)  # which graphs have run once (full: True, shallow: False)


class _Step(NamedTuple):
    entry: _Entry
    leaves: list[Any]
    full: bool
    signature: Signature
    key: _Key


_UNSET: Any = object()  # configure(): "this key was not given"

# What a program depends on besides the signature: the branch and the compile options.
_Key = tuple[Signature, int, Hashable]


def _compile_key(spec: object) -> Hashable:
    """A hashable stand-in for a ``compile=`` value (dicts may hold unhashable values, such as a backend)."""
    if spec is None or spec is False:
        return False
    if isinstance(spec, Mapping):
        return tuple(sorted((str(k), _compile_key(v)) for k, v in spec.items()))
    try:
        hash(spec)
    except TypeError:
        return ("object", id(spec))
    return spec


def _number_leaves(sig: Signature) -> list[int]:
    return [i for i, d in enumerate(sig.leaves) if d[0] == "const" and d[1] in (int, float)]


def _warn_if_number_changed(sig: Signature, known: Iterable[Signature]) -> None:
    # A Python number is baked into the captured graph; one that changes every step would mean a
    # capture per step. Say so once it happens.
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
                    stacklevel=5,
                )
                return


def _step_info(value: object) -> StepInfo | None:
    # A step source may return StepInfo or a plain (new_generation, step[, total]) tuple.
    if value is None or isinstance(value, StepInfo):
        return value
    if isinstance(value, tuple) and len(value) in (2, 3):
        return StepInfo(*value) if len(value) == 3 else StepInfo(value[0], value[1], None)
    raise TypeError(
        f"step_source must return fxcache.runtime.StepInfo(new_generation, step, total), a "
        f"(new_generation, step[, total]) tuple, or None; got {value!r}"
    )


def _timestep_value(args: tuple, kwargs: dict[str, Any]) -> float | None:
    # The diffusion convention: the timestep is the second positional argument or `timestep=`.
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor) and t.numel() > 0 and not t.is_complex():
        return float(t.reshape(-1)[0])  # a host read; fxcache.enable(pipe) avoids it
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _lift_timestep(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """The call with a Python-number timestep made ``torch.tensor(t)``, or None when there is none.

    A number would be a constant of the captured graph (a capture per step); as a tensor input one
    capture serves every step. ``torch.tensor(t)`` infers the dtype as torch does (int64 for an int,
    the default float dtype for a float), so the result equals passing ``torch.tensor(t)`` yourself.
    """
    if "timestep" in kwargs:
        if _is_number(kwargs["timestep"]):
            return args, {**kwargs, "timestep": torch.tensor(kwargs["timestep"])}
    elif len(args) > 1 and _is_number(args[1]):
        return (args[0], torch.tensor(args[1]), *args[2:]), kwargs
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
        self._config = config
        self.fxcache_state = CacheState()
        self.step_source: StepSource | None = None
        self._plans: dict[int, dict[Signature, CachePlan]] = {}  # branch -> signature -> plan
        self._entries: dict[_Key, _Entry] = {}  # what runs: plan + backend callables
        self._compile_key = _compile_key(config.compile)
        self._lift_numbers = True  # turned off when the model needs its timestep as a Python number

    @property
    def plans(self) -> Mapping[Signature, CachePlan]:
        """The plans built so far for the current branch, by input signature (a read-only live view).

        One capture serves every call with the same signature; ``len(cached.plans)`` counts captures.

        Example:
            >>> import torch, fxcache
            >>> class UNetish(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
            ...         self.up = torch.nn.Upsample(scale_factor=2)
            ...     def forward(self, x, t):
            ...         return x + self.up(self.down(x)) * t
            >>> cached = fxcache.transform(UNetish(), branch=0, interval=2)
            >>> x = torch.randn(1, 4, 8, 8)
            >>> _ = [cached(x, t) for t in (3, 2, 1)]   # int timesteps are passed to the graph as tensors
            >>> len(cached.plans)
            1
            >>> next(iter(cached.plans.values())).cache_shape
            (1, 4, 8, 8)
        """
        return types.MappingProxyType(self._plans.setdefault(self._config.branch, {}))

    @property
    def cache_config(self) -> CacheConfig:
        """The settings in force (read-only; change them with :meth:`configure`).

        Not ``.config``: that name falls through to the wrapped model (a diffusers UNet's config),
        which pipelines read.
        """
        return self._config

    def configure(
        self,
        *,
        branch: Any = _UNSET,
        interval: Any = _UNSET,
        schedule: Any = _UNSET,
        total_steps: Any = _UNSET,
        compile: Any = _UNSET,
    ) -> CachedModule:
        """Change some settings; the keys not given keep their values. Returns ``self``.

        The new settings are validated by building a new :class:`CacheConfig` (nothing changes when
        that raises). ``interval`` and ``schedule`` are two spellings of one setting: giving one clears
        the other. Graphs are kept per input signature, branch and compile options, so changing only
        the schedule keeps every graph, and going back to an earlier branch or compile setting reuses
        the graphs built for it. A new branch or compile setting also starts a new generation.

        Example:
            >>> import torch, fxcache
            >>> cached = fxcache.transform(torch.nn.Identity(), branch=0, interval=3)
            >>> cached.configure(interval=5).cache_config.interval
            5
            >>> cached.configure(branch=-1)
            Traceback (most recent call last):
            ...
            ValueError: branch=-1 is out of range: branches are numbered from 0 (the shallowest skip connection)
        """
        changes = {
            k: v
            for k, v in dict(
                branch=branch, interval=interval, schedule=schedule, total_steps=total_steps, compile=compile
            ).items()
            if v is not _UNSET
        }
        if "interval" in changes and "schedule" not in changes:
            changes["schedule"] = None
        elif "schedule" in changes and "interval" not in changes:
            changes["interval"] = None
        config = dataclasses.replace(self._config, **changes)
        if self.step_source is None:
            check_total_steps(config)
        old_key = (self._config.branch, self._compile_key)
        self._config, self._compile_key = config, _compile_key(config.compile)
        if old_key != (config.branch, self._compile_key):
            self.fxcache_state.reset()  # other graphs, another cache buffer: start a new generation
        return self

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
        # .to()/.half() may replace tensors and always moves the cache's device or dtype: capture
        # again at the next call rather than keep graphs bound to the old tensors.
        self.drop_graphs()
        return self

    def extra_repr(self) -> str:
        c = self._config
        return f"branch={c.branch}, schedule={c.steps_schedule!r}, compile={c.compile!r}"

    # -- the step logic, all outside Dynamo -----------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache; the next call starts a new generation and runs in full."""
        self.fxcache_state.reset()

    def drop_graphs(self) -> None:
        """Forget the plans, their compiled graphs and the cache; the next call captures (and compiles) again.

        Needed only after changing weights in place under ``compile={"options": {"freezing": True}}``,
        which compiles the weights in as constants. ``.to()`` and ``.half()`` do this by themselves.
        """
        for by_signature in self._plans.values():
            by_signature.clear()  # cleared in place: views handed out by .plans stay live
        self._entries.clear()
        self.fxcache_state.reset()

    def _setup_failed(self, error: BaseException) -> None:
        """Called when capturing or compiling fails, before the error propagates; subclasses undo their setup."""

    def _forget(self, key: _Key) -> None:
        sig, branch, _ = key
        self._entries.pop(key, None)
        self._plans.get(branch, {}).pop(sig, None)

    def _entry(self, args: tuple, kwargs: dict[str, Any]) -> tuple[_Entry, list[Any], Signature, _Key]:
        """The plan and callables for this call, built at the first call of each (signature, branch, compile)."""
        lifted = _lift_timestep(args, kwargs) if self._lift_numbers else None
        call_args, call_kwargs = lifted if lifted is not None else (args, kwargs)
        leaves, sig = flatten_call(self.model, call_args, call_kwargs)
        key = (sig, self._config.branch, self._compile_key)
        entry = self._entries.get(key)
        if entry is not None:
            return entry, leaves, sig, key
        try:
            by_signature = self._plans.setdefault(self._config.branch, {})
            cache_plan = by_signature.get(sig)
            if cache_plan is None:
                _warn_if_number_changed(sig, [s for plans in self._plans.values() for s in plans])
                cache_plan = plan(self.model, call_args, call_kwargs, branch=self._config.branch)
                by_signature[sig] = cache_plan
            entry = self._entries[key] = _Entry(cache_plan, backends.for_spec(cache_plan, self._config.compile))
        except CaptureError as exc:
            if lifted is not None:
                # The model needs its timestep as a Python number (it branches on it, say): capture
                # calls as given from now on, one capture per timestep value, as without lifting.
                self._lift_numbers = False
                return self._entry(args, kwargs)
            self._setup_failed(exc)
            raise
        except Exception as exc:
            self._setup_failed(exc)
            raise
        return entry, leaves, sig, key

    def _is_full_step(self, sig: Signature, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Advance the state by one call; True when this call must run in full."""
        st = self.fxcache_state
        new_generation = st.step < 0 or st.signature != sig
        total = self._config.total_steps
        external = _step_info(self.step_source() if self.step_source is not None else None)
        if external is not None:
            new_generation = new_generation or external.new_generation
            step = external.step
            total = external.total if external.total is not None else total
        else:
            t = _timestep_value(args, kwargs)
            if t is not None and st.last_timestep is not None and t > st.last_timestep:
                new_generation = True  # timesteps fall within a generation; a rise means a new one
            st.last_timestep = t
            step = 0 if new_generation else st.step + 1
        st.step = step
        if new_generation:
            st.generation_full_steps = st.generation_shallow_steps = 0
        return new_generation or self._config.steps_schedule.is_full(step, total)

    @torch._dynamo.disable
    def _prepare(self, args: tuple, kwargs: dict[str, Any]) -> _Step:
        entry, leaves, sig, key = self._entry(args, kwargs)
        full = self._is_full_step(sig, args, kwargs)
        st = self.fxcache_state
        if full:
            st.signature = None  # the buffer is being rewritten: valid again once the full graph ran
            st.full_steps += 1
            st.generation_full_steps += 1
        else:
            st.shallow_steps += 1
            st.generation_shallow_steps += 1
        if entry.graphs.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # each step is one iteration of the loop
        return _Step(entry, leaves, full, sig, key)

    @torch._dynamo.disable
    def _first_call_failed(self, step: _Step, error: Exception) -> None:
        # The graph compiles at its first call: a failure there leaves nothing usable for this key.
        if self._entries.get(step.key) is step.entry:
            self._forget(step.key)
        self.fxcache_state.reset()
        what = "full" if step.full else "shallow"
        if self._config.compile:
            hint = "torch.compile compiles it then; compile=False runs the same graphs eagerly"
        else:
            hint = "under your own torch.compile, Dynamo compiles it then; fxcache.explain shows the cut"
        add_note(error, f"fxcache: the {what} graph failed at its first call ({hint}); its graphs were dropped.")
        self._setup_failed(error)

    @torch._dynamo.disable
    def _finish(self, step: _Step, outputs: Any) -> Any:
        step.entry.ran.add(step.full)
        if step.full:
            self.fxcache_state.signature = step.signature  # the cache now holds this signature's feature
        if step.entry.graphs.cudagraphs:
            # The next replay overwrites a CUDA graph's outputs: hand the caller its own copies.
            outputs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outputs]
        return step.entry.plan.unflatten(outputs)

    # Skip this frame but not the frames it calls: under a user's torch.compile, the graphs below
    # are compiled, while the step logic (in the disabled helpers) runs as plain Python.
    @torch._dynamo.disable(recursive=False)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        step = self._prepare(args, kwargs)
        graphs = step.entry.graphs
        graph = graphs.full if step.full else graphs.shallow
        try:
            outputs = graph(*step.leaves)
        except Exception as exc:
            if step.full not in step.entry.ran:  # its first call, where it compiles
                self._first_call_failed(step, exc)
            raise
        return self._finish(step, outputs)
