"""Stage 4: run the full and shallow graphs on DeepCache's schedule.

Which graph runs is decided here, in plain Python between the graphs, never inside them. That
Python is kept out of Dynamo, so a user's ``torch.compile(cached)`` compiles the two graphs it calls
(once each per input signature) and never recompiles because a step counter moved.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fxcache import backends
from fxcache.backends import Graphs
from fxcache.capture import Signature, flatten_call
from fxcache.compile import compile_options, dynamo_config, skip_frame
from fxcache.config import CacheConfig, check_total_steps
from fxcache.errors import CaptureError, add_note
from fxcache.fx_source_cache import forget_fx_sources, fx_sources
from fxcache.gate import TRACING
from fxcache.generations import CacheState, Generation, Slot
from fxcache.kept_programs import KeptPrograms
from fxcache.plan import CachePlan, plan
from fxcache.watch import fingerprint

__all__ = ["CachedModule", "CacheState", "StepInfo", "StepSource", "generation_rule"]


class StepInfo(NamedTuple):
    """What a step source knows about the next call."""

    new_generation: bool
    step: int  # index within the generation, 0-based
    total: int | None  # steps in this generation, when known


# Supplies the StepInfo for the next call, or None to fall back to the module's own rule.
StepSource = Callable[[], "StepInfo | None"]


@dataclass
class _Entry:
    """A plan and the callables a backend made of it, for one (signature, branch, compile) key."""

    plan: CachePlan
    graphs: Graphs
    slot: Slot  # where the graphs read and write the deep feature, shared by the generations that run them
    ran: set[bool] = field(default_factory=set)  # which graphs have run once (full: True, shallow: False)
    fx_sources: tuple[str, ...] = ()  # torch.fx's sources of GraphModules the backend made (a bound buffer's)

    @staticmethod
    def of(plan: CachePlan, graphs: Graphs, fx_sources: tuple[str, ...] = ()) -> _Entry:
        return _Entry(plan, graphs, graphs.slot, fx_sources=fx_sources)

    def forget_sources(self) -> None:
        forget_fx_sources(self.fx_sources)
        forget_fx_sources(self.plan.fx_sources)


class _ProgramTable:
    """The programs a module keeps, by key, least recently used first.

    Every access takes the table's own lock, held for that one operation only (never while a program is built
    or runs), so a call whose program exists never waits for another thread's capture. Programs are added and
    removed only under the module's lock (one thread builds or drops at a time); a call's lookup only reorders.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def values(self) -> list[_Entry]:
        with self._lock:
            return list(self._entries.values())

    def items(self) -> list[tuple[_Key, _Entry]]:
        with self._lock:
            return list(self._entries.items())

    def get(self, key: _Key) -> _Entry | None:
        """The program for ``key``, now the most recently used; None if there is none."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def add(self, key: _Key, entry: _Entry) -> None:
        with self._lock:
            self._entries[key] = entry

    def pop(self, key: _Key) -> _Entry | None:
        with self._lock:
            return self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def oldest(self) -> tuple[_Key, bool]:
        """The least recently used key, and whether its plan also serves another program (another compile key)."""
        with self._lock:
            key, entry = next(iter(self._entries.items()))
            return key, any(e.plan is entry.plan for k, e in self._entries.items() if k != key)


class _Call(NamedTuple):
    """A call as the graphs take it: the arguments (timestep lifted to a tensor), leaves, signature."""

    args: tuple
    kwargs: dict[str, Any]
    leaves: list[Any]
    signature: Signature
    lifted: bool


class _Step(NamedTuple):
    entry: _Entry
    leaves: list[Any]
    full: bool
    signature: Signature
    key: _Key
    state: CacheState  # the generation the call belongs to


_UNSET: Any = object()  # configure(): "this key was not given"

# Each model's programs, kept past the module that built them (fxcache.kept_programs): a module made later for
# the same model with the same settings (enable after disable, a second transform) reuses them.
_KEPT: KeptPrograms[_Entry] = KeptPrograms(on_drop=_Entry.forget_sources)

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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def generation_rule(previous: float | None, current: float | None) -> str:
    """Where a call falls, from the timestep of the previous call in the generation and its own.

    ``"new"``: it starts a new generation (no previous call, or the timestep rose: denoising runs
    from high timesteps to low). ``"same"``: the same step as the previous call (the same timestep,
    as PNDM and Heun evaluate some twice, or a retried call), so the same full/shallow decision.
    ``"next"``: the next step (the timestep fell, or it is unknown: calls are counted).
    The one rule every caller of the runtime uses; a step source (the diffusers adapter) replaces it.

    Example:
        >>> [generation_rule(None, 999.0), generation_rule(999.0, 999.0), generation_rule(999.0, 979.0),
        ...  generation_rule(19.0, 999.0), generation_rule(5.0, None)]
        ['new', 'same', 'next', 'new', 'next']
    """
    if previous is None and current is None:
        return "next"
    if previous is None:
        return "new"
    if current is None:
        return "next"
    if current > previous:
        return "new"
    return "same" if current == previous else "next"


_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "noise_level")


@dataclass(frozen=True)
class _TimestepArg:
    """Where a model's forward takes its timestep: a parameter name and/or a positional index.

    Found from ``inspect.signature(model.forward)``: the parameter named ``timestep``, ``t``,
    ``timesteps``, ``sigma``... wherever it is, else the second positional parameter (the diffusion
    convention). Reading it by both name and position finds it however the caller passes it.
    """

    name: str | None
    index: int | None

    @staticmethod
    def of(model: torch.nn.Module) -> _TimestepArg:
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            return _TimestepArg("timestep", 1)
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for p in params:
            if p.name in _TIMESTEP_NAMES and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                index = positional.index(p) if p in positional else None
                return _TimestepArg(None if p.kind == p.POSITIONAL_ONLY else p.name, index)
        if len(positional) > 1:
            second = positional[1]
            return _TimestepArg(None if second.kind == second.POSITIONAL_ONLY else second.name, 1)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return _TimestepArg("timestep", 1)  # forward(*args, **kwargs): the convention
        return _TimestepArg(None, None)

    def get(self, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        if self.name is not None and self.name in kwargs:
            return kwargs[self.name]
        if self.index is not None and len(args) > self.index:
            return args[self.index]
        return None

    def value(self, args: tuple, kwargs: Mapping[str, Any]) -> float | None:
        """The timestep as a float (a host read for a tensor; ``fxcache.enable(pipe)`` avoids it), or None."""
        t = self.get(args, kwargs)
        if isinstance(t, torch.Tensor) and t.numel() > 0 and not t.is_complex():
            return float(t.reshape(-1)[0])
        if _is_number(t):
            return float(t)
        return None

    def lift(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """The call with a Python-number timestep made ``torch.tensor(t)``, or None when there is none.

        A number would be a constant of the captured graph (a capture per step); as a tensor input one
        capture serves every step. ``torch.tensor(t)`` infers the dtype as torch does (int64 for an int,
        the default float dtype for a float), so the result equals passing ``torch.tensor(t)`` yourself.
        """
        if self.name is not None and self.name in kwargs:
            if _is_number(kwargs[self.name]):
                return args, {**kwargs, self.name: torch.tensor(kwargs[self.name])}
        elif self.index is not None and len(args) > self.index and _is_number(args[self.index]):
            i = self.index
            return (*args[:i], torch.tensor(args[i]), *args[i + 1 :]), kwargs
        return None


_MODEL = "model."


def _unprefix_state_dict(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # Post-hook of CachedModule.state_dict: the wrapped model's keys as the model itself names them.
    inner = prefix + _MODEL
    for key in list(state_dict):
        value = state_dict.pop(key)  # popped and put back in order, renamed where needed
        state_dict[prefix + key[len(inner) :] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in list(metadata):
            if key == inner[:-1] or key.startswith(inner):
                metadata[prefix + key[len(inner) :] if key.startswith(inner) else prefix[:-1]] = metadata.pop(key)


def _prefix_state_dict(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # Pre-hook of CachedModule.load_state_dict: keys named as the wrapped model names them go to it.
    inner = prefix + _MODEL
    for key in list(state_dict):
        if key.startswith(prefix) and not key.startswith(inner):
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in list(metadata):
            if key.startswith(prefix) and key != prefix[:-1] and not (key == inner[:-1] or key.startswith(inner)):
                metadata[inner + key[len(prefix) :]] = metadata[key]
        if prefix[:-1] in metadata:
            metadata.setdefault(inner[:-1], metadata[prefix[:-1]])


class CachedModule(torch.nn.Module):
    """A model that runs DeepCache: full steps on schedule, shallow steps in between.

    Made by :func:`fxcache.transform`. It holds the user's model as ``.model`` (weights shared, never
    copied) and forwards every attribute it does not have to it, so ``.config``, ``.dtype`` and
    friends behave as on the original. Call :meth:`reset` to start a new generation by hand.
    """

    def __init__(self, model: torch.nn.Module, config: CacheConfig) -> None:
        if isinstance(model, CachedModule):
            raise TypeError(
                "this model is already transformed by fxcache (a CachedModule): change its settings with "
                "cached.configure(...), or transform the original, fxcache.transform(cached.model, ...)"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"fxcache.transform takes a torch.nn.Module, got {type(model).__name__}")
        super().__init__()
        self.model = model
        self._config = config
        self.step_source: StepSource | None = None
        self._compile_key = _compile_key(config.compile)
        self._lift_numbers = True  # turned off when the model needs its timestep as a Python number
        self._timestep = _TimestepArg.of(model)
        self._init_shared_state()
        # state_dict()/load_state_dict() read and write the wrapped model's keys, without "model.".
        self.register_state_dict_post_hook(_unprefix_state_dict)
        self.register_load_state_dict_pre_hook(_prefix_state_dict)

    def _init_shared_state(self) -> None:
        # What every generation shares (plans, graphs), and where each finds its own state (fxcache.generations).
        self._plans: dict[int, dict[Signature, CachePlan]] = {}  # branch -> signature -> plan
        self._entries = _ProgramTable()  # what runs, least recently used first
        self._fingerprint: Hashable | None = None  # the model as the graphs saw it (fxcache.watch)
        self._epoch = 0  # bumped when graphs or settings change under running generations: they start again
        self._lock = threading.RLock()  # held while plans and graphs are built, checked or dropped
        self._threads = threading.local()  # each thread's default generation state
        self._generation_var: contextvars.ContextVar[Generation | None] = contextvars.ContextVar(
            f"fxcache_generation_{id(self):x}", default=None
        )

    @property
    def fxcache_state(self) -> CacheState:
        """The step state of the current generation: the one entered with :meth:`generation`, else this thread's."""
        generation = self._generation_var.get()
        if generation is not None:
            return generation.state
        try:
            return self._threads.state
        except AttributeError:
            state = self._threads.state = CacheState()
            return state

    def generation(self) -> Generation:
        """A new generation: ``with cached.generation():`` runs the calls inside it with their own step state
        and cached feature, apart from any other thread, asyncio task or generation using this module.

        Weights, plans and compiled graphs are shared; the step counter, the timestep history and the deep
        feature belong to the generation. Without it, each thread has one state of its own. Leaving the block
        frees its cache; a generation kept in a variable can be entered again, call by call (for example one
        per classifier-free-guidance branch when a loop calls the model twice per step), and keeps its cache
        until it is dropped or closed.

        Example:
            >>> import torch, fxcache
            >>> class UNetish(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
            ...         self.up = torch.nn.Upsample(scale_factor=2)
            ...     def forward(self, x, t):
            ...         return x + self.up(self.down(x)) * t
            >>> cached = fxcache.transform(UNetish(), branch=0, interval=3)
            >>> x_cond, x_uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
            >>> cond, uncond = cached.generation(), cached.generation()
            >>> for t in (3.0, 2.0, 1.0):        # two calls per step, one generation each
            ...     with cond:
            ...         y_cond = cached(x_cond, torch.tensor(t))
            ...     with uncond:
            ...         y_uncond = cached(x_uncond, torch.tensor(t))
            >>> cond.state.generation_full_steps, cond.state.generation_shallow_steps
            (1, 2)
        """
        return Generation(self._generation_var)

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
    def slots(self) -> Mapping[Signature, Slot]:
        """Where each plan's cached feature lives, by input signature, for the current branch and compile setting
        (a snapshot): a :class:`~fxcache.generations.BufferSlot` (``.buffer``, bound into compiled graphs) or a
        :class:`~fxcache.generations.CellSlot` (the tensors eager full steps returned). ``slot.contents()`` is the
        feature of the generation that ran last on it.
        """
        with self._lock:
            current = (self._config.branch, self._compile_key)
            return types.MappingProxyType({k[0]: e.slot for k, e in self._entries.items() if k[1:] == current})

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
        max_plans: Any = _UNSET,
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
                branch=branch,
                interval=interval,
                schedule=schedule,
                total_steps=total_steps,
                compile=compile,
                max_plans=max_plans,
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
        with self._lock:
            self._config, self._compile_key = config, _compile_key(config.compile)
            if old_key != (config.branch, self._compile_key):
                self._epoch += 1  # other graphs, another cache buffer: every generation starts again
            self._evict()
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

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickle) starts unused: graphs, compiled code and the cache belong to
        # the original's tensors, and the copy captures its own at its first call.
        state = dict(self.__dict__)
        for name in ("_plans", "_entries", "_fingerprint", "_epoch", "_lock", "_threads", "_generation_var"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_shared_state()

    def extra_repr(self) -> str:
        c = self._config
        return f"branch={c.branch}, schedule={c.steps_schedule!r}, compile={c.compile!r}"

    # -- the step logic, all outside Dynamo -----------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation's cache (this thread's, or the entered :meth:`generation`'s); its next
        call starts a new generation and runs in full."""
        self.fxcache_state.reset()

    def drop_graphs(self) -> None:
        """Forget the plans, their compiled graphs and the cache; the next call captures (and compiles) again.

        The way to say "the model changed" when fxcache cannot see it: a Python attribute the forward
        reads (``self.scale = 2.0``) or a tensor that is neither a parameter nor a buffer. Changes to
        the module tree, parameter and buffer objects, hooks, attention processors and adapter
        switches are noticed by themselves at the start of the next generation, and in-place weight
        updates too under Inductor's freezing. ``.to()`` and ``.half()`` drop the graphs at once.
        """
        with self._lock:
            self._drop_plans()
            _KEPT.forget(self.model)  # not for another module of this model either
        self.fxcache_state.reset()

    def _drop_plans(self) -> None:
        # Every generation's cached feature came from these graphs: all start again (their next call is full).
        for entry in self._entries.values():
            self._forget_sources(entry)
        for by_signature in self._plans.values():
            for dropped in by_signature.values():
                self._forget_sources(dropped)
            by_signature.clear()  # cleared in place: views handed out by .plans stay live
        self._entries.clear()
        self._epoch += 1

    def _evict(self) -> None:
        """Drop the least recently used programs beyond ``max_plans`` (and their plans, when no program is left
        using them). A generation whose feature was in an evicted slot keeps it: its next shallow step copies it
        into the rebuilt plan's slot (:meth:`fxcache.generations.Slot.held`)."""
        while len(self._entries) > self._config.max_plans:
            key, shared = self._entries.oldest()
            if shared:
                entry = self._entries.pop(key)  # its plan serves another program (another compile setting): keep it
                if entry is not None:
                    self._forget_sources(entry)
            else:
                self._forget(key)

    def _check_model(self) -> None:
        """At a generation's start: capture again if the model changed since the graphs were built."""
        versions = bool(dynamo_config(compile_options(self._config.compile, torch.device("cpu"))))
        # Never while a capture runs (here or in another thread): torch.export patches the module as it traces.
        with self._lock, TRACING.shared():
            current = fingerprint(self.model, versions=versions)
            if current != self._fingerprint and self._fingerprint is not None:
                self._drop_plans()
            self._fingerprint = current

    def _setup_failed(self, error: BaseException) -> None:
        """Called when capturing or compiling fails, before the error propagates; subclasses undo their setup."""

    def _forget(self, key: _Key) -> None:
        """Drop the program for ``key`` and its plan, with the torch.fx sources the plan made
        (:mod:`fxcache.fx_source_cache`)."""
        sig, branch, _ = key
        entry = self._entries.pop(key)
        if entry is not None:
            self._forget_sources(entry)
        by_signature = self._plans.get(branch, {})
        dropped = entry.plan if entry is not None else by_signature.get(sig)
        if dropped is None:
            return
        if by_signature.get(sig) is dropped:
            del by_signature[sig]
        self._forget_sources(dropped)

    def _forget_sources(self, dropped: CachePlan | _Entry) -> None:
        # A program kept for later modules of this model keeps its sources until it is dropped there.
        if isinstance(dropped, _Entry):
            if not _KEPT.holds(self.model, lambda kept: kept is dropped):
                forget_fx_sources(dropped.fx_sources)
        elif not _KEPT.holds(self.model, lambda kept: kept.plan is dropped):
            forget_fx_sources(dropped.fx_sources)

    def _flatten(self, args: tuple, kwargs: dict[str, Any]) -> _Call:
        lifted = self._timestep.lift(args, kwargs) if self._lift_numbers else None
        call_args, call_kwargs = lifted if lifted is not None else (args, kwargs)
        leaves, sig = flatten_call(self.model, call_args, call_kwargs)
        return _Call(call_args, call_kwargs, leaves, sig, lifted is not None)

    def _entry(self, args: tuple, kwargs: dict[str, Any], call: _Call) -> tuple[_Entry, _Call, _Key]:
        """The plan and callables for this call, built at the first call of each (signature, branch, compile)."""
        key = (call.signature, self._config.branch, self._compile_key)
        entry = self._entries.get(key)
        if entry is not None:  # if another thread evicts it before it runs, it still runs (its slot goes with it)
            return entry, call, key
        try:
            with self._lock:  # one thread builds; the others wait for it and reuse what it built
                entry = self._entries.get(key)
                if entry is not None:
                    return entry, call, key
                by_signature = self._plans.setdefault(self._config.branch, {})
                cache_plan = by_signature.get(call.signature)
                kept = _KEPT.get(self.model, key, self._fingerprint) if self._fingerprint is not None else None
                if kept is not None and cache_plan in (None, kept.plan):  # built by an earlier module of this model
                    by_signature[call.signature] = kept.plan
                    self._entries.add(key, kept)
                    self._evict()
                    return kept, call, key
                if cache_plan is None:
                    _warn_if_number_changed(call.signature, [s for plans in self._plans.values() for s in plans])
                    cache_plan = plan(self.model, call.args, call.kwargs, branch=self._config.branch)
                    by_signature[call.signature] = cache_plan
                with fx_sources() as made:  # a backend may make GraphModules of its own (a bound buffer)
                    graphs = backends.for_spec(cache_plan, self._config.compile)
                entry = _Entry.of(cache_plan, graphs, tuple(made))
                self._entries.add(key, entry)
                if self._fingerprint is not None:
                    _KEPT.put(self.model, key, self._fingerprint, entry, self._config.max_plans)
                self._evict()
        except CaptureError as exc:
            if call.lifted:
                # The model needs its timestep as a Python number (it branches on it, say): capture
                # calls as given from now on, one capture per timestep value, as without lifting.
                self._lift_numbers = False
                return self._entry(args, kwargs, self._flatten(args, kwargs))
            self._setup_failed(exc)
            raise
        except Exception as exc:
            self._setup_failed(exc)
            raise
        return entry, call, key

    def _decide(self, sig: Signature, args: tuple, kwargs: dict[str, Any]) -> tuple[bool, bool]:
        """Advance the state by one call: (new generation?, full?)."""
        st = self.fxcache_state
        new_generation = st.step < 0 or st.signature != sig or st.epoch != self._epoch
        total = self._config.total_steps
        external = _step_info(self.step_source() if self.step_source is not None else None)
        if external is not None:
            new_generation = new_generation or external.new_generation
            step = external.step
            total = external.total if external.total is not None else total
            same = not new_generation and step == st.step
        else:
            t = self._timestep.value(args, kwargs)
            where = generation_rule(None if new_generation else st.last_timestep, t)
            new_generation = new_generation or where == "new"
            same = where == "same" and not new_generation
            st.last_timestep = t
            step = 0 if new_generation else st.step if same else st.step + 1
        st.step = step
        if new_generation:
            st.generation_full_steps = st.generation_shallow_steps = 0
            st.overrun_warned = False
        if new_generation:
            full = True
            if total is not None and self._config.steps_schedule.needs_total:
                self._config.steps_schedule.full_steps(total)  # a schedule that cannot fit says so at step 0
        elif same:
            full = st.last_full  # the same step again: the same decision
        else:
            full = self._config.steps_schedule.is_full(step, total)
        if total is not None and step >= total and not st.overrun_warned:
            st.overrun_warned = True
            warnings.warn(
                f"fxcache: this generation reached step {step}, but its schedule "
                f"({self._config.steps_schedule!r}) was sized for {total} steps; steps from {total} on follow "
                "the schedule as it is (a non-uniform one runs them all shallow). Pass the real number of "
                "steps (total_steps=, or fxcache.enable for a pipeline) or call reset() between generations.",
                stacklevel=4,
            )
        st.last_full = full
        return new_generation, full

    @torch._dynamo.disable
    def _prepare(self, args: tuple, kwargs: dict[str, Any]) -> _Step:
        """Decide the step and find its graphs (``forward`` then holds their slot while they run)."""
        call = self._flatten(args, kwargs)
        st = self.fxcache_state
        try:
            new_generation, full = self._decide(call.signature, args, kwargs)
            if new_generation:
                self._check_model()
                st.epoch = self._epoch
            entry, call, key = self._entry(args, kwargs, call)
        except BaseException:
            st.reset()  # nothing ran: the next call starts afresh
            raise
        if full:
            st.signature = None  # the buffer is being rewritten: valid again once the full graph ran
            st.full_steps += 1
            st.generation_full_steps += 1
        else:
            st.shallow_steps += 1
            st.generation_shallow_steps += 1
        return _Step(entry, call.leaves, full, call.signature, key, st)

    @staticmethod
    @torch._dynamo.disable
    def _mark_cudagraph_step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # each step is one iteration of the loop

    @torch._dynamo.disable
    def _first_call_failed(self, step: _Step, error: Exception) -> None:
        # The graph compiles at its first call: a failure there leaves nothing usable for this key.
        with self._lock:
            if self._entries.get(step.key) is step.entry:
                self._forget(step.key)
        step.state.reset()
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
            step.state.signature = step.signature  # the cache now holds this signature's feature
        if step.entry.graphs.cudagraphs:
            # The next replay overwrites a CUDA graph's outputs: hand the caller its own copies.
            outputs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outputs]
        else:
            # An output that is the cached feature (a model returning its deep feature) would change under the
            # caller at the next full step, or the caller's in-place edits would change the cache: copy that one.
            held = {t.untyped_storage().data_ptr() for t in step.entry.slot.contents()}
            outputs = [
                o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in held else o
                for o in outputs
            ]
        return step.entry.plan.unflatten(outputs)

    # Skip this frame but not the frames it calls: under a user's torch.compile, the graphs below
    # are compiled, while the step logic (in the disabled helpers) runs as plain Python.
    @skip_frame
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        step = self._prepare(args, kwargs)
        graphs = step.entry.graphs
        graph = graphs.full if step.full else graphs.shallow
        with step.entry.slot.held(step.state, step.full):  # one call at a time per slot (fxcache.generations)
            try:
                with TRACING.shared():  # no capture in another thread while the graph runs (fxcache.gate)
                    if graphs.cudagraphs:
                        self._mark_cudagraph_step()
                    outputs = graph(*step.leaves)
                    return self._finish(step, outputs)  # in the slot: CUDA graph outputs are copied before a replay
            except Exception as exc:
                if step.full in step.entry.ran:  # not its first call, where it compiles
                    raise
                failed = exc
        self._first_call_failed(step, failed)  # outside the locks: it takes the module's
        raise failed
