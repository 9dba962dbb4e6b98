"""Stage 4: run the full and shallow graphs on DeepCache's schedule.

Which graph runs is decided here, in plain Python between the graphs, never inside them. That
Python is kept out of Dynamo, so a user's ``torch.compile(cached)`` compiles the two graphs it calls
(once each per input signature) and never recompiles because a step counter moved.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fxcache.capture import Captured, Signature, capture, flatten_call
from fxcache.compile import compile_graph, compile_options, uses_cudagraphs
from fxcache.config import CacheConfig, check_total_steps
from fxcache.errors import add_note
from fxcache.passes import SkipMerge, bind_cache_buffer, find_skip_merges, split_at_branch
from fxcache.predicates import tensor_meta

__all__ = ["CachedModule", "CacheState", "StepInfo", "StepSource", "select_branch"]


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
class _Program:
    """The graphs for one input signature, sharing one cache buffer."""

    captured: Captured
    merge: SkipMerge
    cache: torch.Tensor  # written in place by `full`, read by `shallow`
    full: Callable[..., Any]
    shallow: Callable[..., Any]
    cudagraphs: bool
    ran: set[bool] = field(default_factory=set)  # which graphs have run once (full: True, shallow: False)


class _Plan(NamedTuple):
    program: _Program
    leaves: list[Any]
    full: bool
    signature: Signature
    key: _Key


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
        self._programs: dict[_Key, _Program] = {}

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
        old, self._config = self._config, config
        if (old.branch, _compile_key(old.compile)) != (config.branch, _compile_key(config.compile)):
            self.fxcache_state.reset()  # the cache buffer in use is another one now
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
        """Forget the captured and compiled graphs and the cache; the next call captures (and compiles) again.

        Needed only after changing weights in place under ``compile={"options": {"freezing": True}}``,
        which compiles the weights in as constants. ``.to()`` and ``.half()`` do this by themselves.
        """
        self._programs.clear()
        self.fxcache_state.reset()

    def _setup_failed(self, error: BaseException) -> None:
        """Called when capturing or compiling fails, before the error propagates; subclasses undo their setup."""

    def _key(self, sig: Signature) -> _Key:
        return (sig, self._config.branch, _compile_key(self._config.compile))

    def _program(self, sig: Signature, args: tuple, kwargs: dict[str, Any]) -> _Program:
        key = self._key(sig)
        program = self._programs.get(key)
        if program is None:
            _warn_if_number_changed(sig, {k[0] for k in self._programs})
            try:
                program = self._programs[key] = self._build(args, kwargs)
            except Exception as exc:
                self._setup_failed(exc)
                raise
        return program

    def _build(self, args: tuple, kwargs: dict[str, Any]) -> _Program:
        captured = capture(self.model, args, kwargs)
        merge = select_branch(find_skip_merges(captured.gm), self._config.branch, self.model)
        deep = tensor_meta(merge.deep)
        assert deep is not None, "a skip merge's deep input is always a tensor"
        # Allocated once per signature, before any compile, and never reallocated: its address is
        # what CUDA graphs record.
        cache = torch.zeros(deep.shape, dtype=deep.dtype, device=deep.device)
        full, shallow = bind_cache_buffer(*split_at_branch(captured.gm, merge), cache)
        opts = compile_options(self._config.compile, deep.device)
        if opts is None:
            return _Program(captured, merge, cache, full, shallow, cudagraphs=False)
        return _Program(
            captured, merge, cache, compile_graph(full, opts), compile_graph(shallow, opts),
            cudagraphs=uses_cudagraphs(opts, deep.device),
        )  # fmt: skip

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
    def _plan(self, args: tuple, kwargs: dict[str, Any]) -> _Plan:
        leaves, sig = flatten_call(self.model, args, kwargs)
        program = self._program(sig, args, kwargs)
        full = self._is_full_step(sig, args, kwargs)
        st = self.fxcache_state
        if full:
            st.signature = None  # the buffer is being rewritten: valid again once the full graph ran
            st.full_steps += 1
            st.generation_full_steps += 1
        else:
            st.shallow_steps += 1
            st.generation_shallow_steps += 1
        if program.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # each step is one iteration of the loop
        return _Plan(program, leaves, full, sig, self._key(sig))

    @torch._dynamo.disable
    def _first_call_failed(self, plan: _Plan, error: Exception) -> None:
        # The graph compiles at its first call: a failure there leaves no usable program.
        if self._programs.get(plan.key) is plan.program:
            del self._programs[plan.key]
        self.fxcache_state.reset()
        what = "full" if plan.full else "shallow"
        if self._config.compile:
            hint = "torch.compile compiles it then; compile=False runs the same graphs eagerly"
        else:
            hint = "under your own torch.compile, Dynamo compiles it then; fxcache.explain shows the cut"
        add_note(error, f"fxcache: the {what} graph failed at its first call ({hint}); its graphs were dropped.")
        self._setup_failed(error)

    @torch._dynamo.disable
    def _finish(self, plan: _Plan, outputs: Any) -> Any:
        plan.program.ran.add(plan.full)
        if plan.full:
            self.fxcache_state.signature = plan.signature  # the cache now holds this signature's feature
        return plan.program.captured.unflatten(outputs)

    # Skip this frame but not the frames it calls: under a user's torch.compile, the graphs below
    # are compiled, while the step logic (in the disabled helpers) runs as plain Python.
    @torch._dynamo.disable(recursive=False)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan(args, kwargs)
        graph = plan.program.full if plan.full else plan.program.shallow
        try:
            outputs = graph(*plan.leaves)
        except Exception as exc:
            if plan.full not in plan.program.ran:  # its first call, where it compiles
                self._first_call_failed(plan, exc)
            raise
        return self._finish(plan, outputs)
