"""Per-generation state: the step counter and the cached deep feature belong to a generation, not to the module.

A :class:`~fxcache.CachedModule` shares its weights, plans and compiled graphs between all callers. What
changes from step to step (the step index, the last timestep, the full/shallow decision) and the deep feature a
full step left for the shallow steps after it belong to one *generation*: a :class:`CacheState`. The module picks
the state of the call's generation: the :class:`Generation` entered in the current context
(``with cached.generation():``, contextvars-based, so asyncio tasks are kept apart too), else one state per
thread. Threads sharing a module therefore each get their solo results without any new call.

Where the deep feature lives: in the :class:`Slot` the backend chose for the plan's graphs. Compiled graphs are
bound to one fixed buffer (:class:`BufferSlot`), which is what CUDA graphs need: their recorded kernels read and
write that address. Eager graphs and packages keep the tensor the last full step returned (:class:`CellSlot`),
so "copying" below is swapping a reference there. Generations share a slot: the slot remembers
which generation's feature it holds (its *owner*). A generation that is alone never copies anything: its full
step writes the slot and its shallow steps read it. When another generation takes the slot, the owner's feature
is first copied to a private tensor of the owner's (:attr:`CacheState.saved`), and a shallow step of a
generation whose feature is not in the slot copies it back in first. So interleaved generations pay one
device-side copy per switch (no host sync), and one generation pays nothing. Calls on one slot run one at a time
(``with slot.held(state, full):`` around the graph run); calls on different plans (other shapes) do not wait for
each other.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fxcache.capture import Signature

__all__ = ["BufferSlot", "CacheState", "CellSlot", "Decision", "Generation", "Slot"]


class Slot:
    """Where one plan's graphs read and write the deep feature; shared by every generation that runs the plan.

    ``lock`` is held while a step runs on the slot (:meth:`held`); ``owner`` is a weak reference to the
    :class:`CacheState` whose feature the slot holds (or None).

    Example:
        >>> slot, a, b = BufferSlot(torch.zeros(1)), CacheState(), CacheState()
        >>> with slot.held(a, full=True):    # a's full step writes its feature
        ...     _ = slot.buffer.fill_(1.0)
        >>> with slot.held(b, full=True):    # b takes the slot: a's feature is kept aside first
        ...     _ = slot.buffer.fill_(2.0)
        >>> with slot.held(a, full=False):   # a's shallow step gets its own feature back
        ...     read = slot.buffer.clone()
        >>> read, slot.lock.locked()
        (tensor([1.]), False)
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: weakref.ref[CacheState] | None = None

    @contextmanager
    def held(self, st: CacheState, full: bool) -> Iterator[None]:
        """Hold the slot for one step of ``st``'s generation: the block runs with :attr:`lock` held and the slot
        ready for the step; leaving the block (returning or raising) releases it.

        A full step will write the slot; a shallow step reads it, so it must hold ``st``'s feature. A generation
        whose feature sits in another slot (its plan was evicted and built again) brings it home first.
        """
        old = st.slot
        if not full and old is not None and old is not self and not st.saved_current:
            with old.lock:
                _write_back(old, st)
        with self.lock:
            self._take(st, full)
            yield

    def _take(self, st: CacheState, full: bool) -> None:
        # Under the lock: make the slot ``st``'s, keeping its previous owner's feature in that owner's ``saved``.
        owner = self.owner() if self.owner is not None else None
        if owner is not st:
            if owner is not None:
                _write_back(self, owner)
            if not full:
                if not st.saved_current or st.saved is None:
                    st.reset()  # nothing ran: the next call starts afresh
                    raise RuntimeError(
                        "fxcache: a shallow step found no cached feature for its generation (an internal error: "
                        "please report it); call reset() and run the generation again"
                    )
                self.load(st.saved)
            self.owner = weakref.ref(st)
        st.slot = self
        if full:
            st.saved_current = False  # the slot is about to hold a newer feature

    def save(self, into: torch.Tensor | None) -> torch.Tensor:
        """A tensor that holds the slot's feature and that later calls will not change (``into`` reused if given)."""
        raise NotImplementedError

    def load(self, feature: torch.Tensor) -> None:
        """Put ``feature`` (a tensor :meth:`save` returned) back as the slot's content."""
        raise NotImplementedError

    def contents(self) -> tuple[torch.Tensor, ...]:
        """The tensors the slot holds now (an output sharing their storage must be copied before it is handed out)."""
        raise NotImplementedError


class BufferSlot(Slot):
    """The plan's cache buffer, bound into its graphs (and so recorded by CUDA graphs): saved and loaded by copy.

    Example:
        >>> slot = BufferSlot(torch.zeros(2))
        >>> slot.buffer += 1; saved = slot.save(None); slot.buffer += 1
        >>> saved, slot.load(saved), slot.buffer
        (tensor([1., 1.]), None, tensor([1., 1.]))
    """

    def __init__(self, buffer: torch.Tensor) -> None:
        super().__init__()
        self.buffer = buffer

    def save(self, into: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            if into is None:
                with torch.inference_mode(False):  # not an inference tensor: copy_ into it later in any mode
                    return self.buffer.clone()
            return into.copy_(self.buffer)

    def load(self, feature: torch.Tensor) -> None:
        with torch.no_grad():
            self.buffer.copy_(feature)

    def contents(self) -> tuple[torch.Tensor, ...]:
        return (self.buffer,)


class CellSlot(Slot):
    """A one-element list holding the latest full step's features (eager and ahead-of-time backends): saved and
    loaded by reference, since each full step returns new tensors and no graph writes into one.

    Example:
        >>> cell = [torch.ones(1)]; slot = CellSlot(cell)
        >>> saved = slot.save(None); cell[0] = torch.zeros(1); slot.load(saved); cell[0] is saved
        True
    """

    def __init__(self, cell: list[Any]) -> None:
        super().__init__()
        self.cell = cell

    def save(self, into: torch.Tensor | None) -> torch.Tensor:
        return self.cell[0]

    def load(self, feature: torch.Tensor) -> None:
        self.cell[0] = feature

    def contents(self) -> tuple[torch.Tensor, ...]:
        held = self.cell[0]
        return tuple(held) if isinstance(held, (tuple, list)) else () if held is None else (held,)


@dataclass
class Decision:
    """A step decision taken ahead of its call (by the diffusers adapter's ControlNet hook); the call consumes it."""

    new_generation: bool
    full: bool
    signature: object  # the input signature the call is expected to have (its cached feature's), or a stand-in
    pruned: bool = False  # the caller skipped inputs only a full step reads: the call must be shallow


@dataclass(eq=False)
class CacheState:
    """One generation's state: the step counters and where its deep feature is. ``reset()`` starts a new one."""

    step: int = -1  # index of the last call in the current generation; -1: no call yet
    last_timestep: float | None = None
    signature: Signature | None = None  # the input signature whose deep feature this generation holds
    full_steps: int = 0  # cumulative counters over this state's life (a thread's, or a Generation's), for reports
    shallow_steps: int = 0
    generation_full_steps: int = 0  # the same counts for the current (or last) generation only
    generation_shallow_steps: int = 0
    last_full: bool = True  # the last call's decision: a call at the same step repeats it
    overrun_warned: bool = False  # warned that this generation ran past the schedule's total
    epoch: int = -1  # the module's epoch (graphs and settings) this generation's feature belongs to
    slot: Slot | None = None  # the slot the feature was last written to or loaded into
    saved: torch.Tensor | None = None  # a private copy, made when another generation took the slot
    saved_current: bool = False  # whether ``saved`` holds the feature (the slot may hold it too)
    ahead: Decision | None = None  # a decision taken ahead of the next call

    def reset(self) -> None:
        self.step, self.last_timestep, self.signature = -1, None, None
        self.generation_full_steps = self.generation_shallow_steps = 0
        self.last_full, self.overrun_warned = True, False
        self.slot, self.saved, self.saved_current, self.ahead = None, None, False, None


def _write_back(slot: Slot, st: CacheState) -> None:
    # st's feature is in ``slot`` (and nowhere else) iff st.slot is slot and saved is not current: keep a copy.
    if st.slot is slot and not st.saved_current:
        st.saved = slot.save(st.saved)
        st.saved_current = True


class Generation:
    """A generation of a :class:`~fxcache.CachedModule`: its own step state and cached feature.

    Made by :meth:`CachedModule.generation`. Inside ``with generation:``, calls of that module (in this context:
    this thread, or this asyncio task) use the generation's state. Leaving the block keeps the state, so a
    generation kept in a variable can be entered again call by call; its cached feature is freed when the object
    is dropped (a ``with cached.generation():`` block leaves nothing behind) or :meth:`close`\\ d.
    A generation is used by one caller at a time.

    Attributes:
        state: the :class:`CacheState` (step counters as ``cached.fxcache_state`` shows them inside the block).
    """

    def __init__(self, var: contextvars.ContextVar[Generation | None]) -> None:
        self.state = CacheState()
        self._var = var
        self._tokens: list[contextvars.Token[Generation | None]] = []

    def __enter__(self) -> Generation:
        self._tokens.append(self._var.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._var.reset(self._tokens.pop())

    def close(self) -> None:
        """Free the cached feature; the next call in this generation starts a new one (a full step)."""
        self.state.reset()

    def __repr__(self) -> str:
        st = self.state
        return f"Generation(step={st.step}, full_steps={st.full_steps}, shallow_steps={st.shallow_steps})"
