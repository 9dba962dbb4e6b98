"""Which denoising steps run the full network.

A schedule is policy only: it answers, for step ``step`` of a generation of ``total`` steps, whether
that step is full. Step 0 is always full (there is nothing cached before it). How a full or a
shallow step is executed lives in :mod:`fxcache.runtime`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "CallableSchedule",
    "ExplicitSchedule",
    "NonUniform",
    "Schedule",
    "ScheduleLike",
    "Uniform",
    "as_schedule",
    "full_steps",
    "nonuniform",
    "uniform",
]


class Schedule:
    """Base class: ``is_full(step, total)``; ``needs_total`` says whether ``total`` must be known."""

    needs_total: bool = False

    def is_full(self, step: int, total: int | None = None) -> bool:
        raise NotImplementedError

    def full_steps(self, total: int) -> list[int]:
        """The sorted indices of the full steps in a generation of ``total`` steps."""
        return [i for i in range(total) if self.is_full(i, total)]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}={value} is invalid: it must be >= {minimum}")


@dataclass(frozen=True)
class Uniform(Schedule):
    """DeepCache's uniform 1:N schedule: step ``i`` is full iff ``i % interval == 0``.

    Example:
        >>> [i for i in range(10) if uniform(3).is_full(i)]
        [0, 3, 6, 9]
    """

    interval: int

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, 1)

    def is_full(self, step: int, total: int | None = None) -> bool:
        return step % self.interval == 0


def uniform(interval: int) -> Uniform:
    """The paper's uniform schedule: one full step, then ``interval - 1`` shallow steps.

    ``interval < 1`` is a ValueError (1 runs every step in full, N runs one full step then N-1 cached
    steps).

    Example:
        >>> uniform(5).is_full(5), uniform(5).is_full(6)
        (True, False)
    """
    return Uniform(interval)


@lru_cache(maxsize=256)
def _quad_center(total: int, count: int, center: float, power: float, reference: bool) -> tuple[int, ...]:
    # The paper's Eq. 7 as its reference pipeline computes it (sample_from_quad_center): `count`
    # positions from a linspace between (-c)^(1/p) and (total - c)^(1/p), raised to p, truncated to
    # integers, deduplicated, interior points shifted by c, with step 0 prepended; if rounding merged
    # positions, lower p by 0.02 and try again. In the reference, (-c)^(1/p) is a Python power of a
    # negative float: a complex number. The arithmetic is complex and the integer cast keeps only the
    # real part. reference=False keeps the sign instead (-|x|^p), the formula as the paper writes it.
    import numpy as np

    p = power
    while p > 1:
        if reference:
            start = complex(-center) ** (1 / p)
            x = np.linspace(start, (total - center) ** (1 / p), count + 1)
            values = (x**p).real
        else:
            x = np.linspace(-(center ** (1 / p)), (total - center) ** (1 / p), count + 1)
            values = np.sign(x) * np.abs(x) ** p
        interior = np.unique(values.astype(np.int32))[1:-1]
        positions = (0, *(int(v + center) for v in interior))
        if len(positions) == count:
            if positions[-1] >= total:
                break  # the center lies so far beyond the end that full steps fall past it
            return positions
        p -= 0.02  # plain float steps, as the reference takes them
    raise ValueError(
        f"nonuniform schedule: no power in ({power}, 1] spreads {count} distinct full steps over {total} "
        f"steps around center {center} (with reference={reference}, a center beyond the last step puts full "
        "steps past the end). Lower the interval, move the center inside the generation, or use "
        "fxcache.full_steps([...])."
    )


@dataclass(frozen=True)
class NonUniform(Schedule):
    """The paper's non-uniform 1:N schedule (Eq. 7): full steps denser around step ``center``.

    As many full steps as ``uniform(interval)`` has (``ceil(total / interval)``). ``reference=True``
    (the default) reproduces the reference implementation, complex arithmetic included, which is what
    the published numbers used; ``reference=False`` computes Eq. 7 in real arithmetic, which is denser
    near the center, as the paper's text describes.

    Example:
        >>> nonuniform(5, center=15, power=1.4).full_steps(50)
        [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
        >>> nonuniform(5, center=15, power=1.4, reference=False).full_steps(50)
        [0, 6, 11, 14, 15, 19, 24, 29, 35, 42]
    """

    interval: int
    center: float = 15
    power: float = 1.4
    reference: bool = True
    needs_total: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, 1)
        for name in ("center", "power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
        if not (self.power > 1 and math.isfinite(self.power)):
            raise ValueError(
                f"power={self.power} is invalid: Eq. 7 needs power > 1, and a finite one (the paper uses 1.4)"
            )
        if not (self.center >= 0 and math.isfinite(self.center)):
            raise ValueError(f"center={self.center} is invalid: it is a step index, so finite and >= 0")
        if not isinstance(self.reference, bool):
            raise TypeError(f"reference must be a bool, got {type(self.reference).__name__} ({self.reference!r})")

    def full_steps(self, total: int) -> list[int]:
        _check_int("total", total, 1)
        count = math.ceil(total / self.interval)
        if count >= total:
            return list(range(total))
        if count == 1:
            return [0]
        if not self.reference and self.center > total:
            raise ValueError(
                f"center={self.center} is beyond this generation's {total} steps: with reference=False, Eq. 7 "
                f"in real arithmetic needs 0 <= center <= total. Move the center inside the generation (for example "
                f"center={total * 0.3:g}, the paper's 15 of 50) or use reference=True"
            )
        return list(_quad_center(total, count, float(self.center), float(self.power), self.reference))

    def is_full(self, step: int, total: int | None = None) -> bool:
        if total is None:
            raise ValueError(_NEEDS_TOTAL.format(self))
        return step == 0 or step in self.full_steps(total)


def nonuniform(interval: int, center: float = 15, power: float = 1.4, *, reference: bool = True) -> NonUniform:
    """The paper's non-uniform schedule; see :class:`NonUniform`."""
    return NonUniform(interval, center, power, reference)


@dataclass(frozen=True)
class ExplicitSchedule(Schedule):
    """Full exactly at the listed steps (and at step 0).

    Example:
        >>> full_steps([0, 1, 2, 4, 8]).full_steps(10)
        [0, 1, 2, 4, 8]
    """

    steps: frozenset[int]

    def is_full(self, step: int, total: int | None = None) -> bool:
        return step == 0 or step in self.steps


def full_steps(steps: Iterable[int]) -> ExplicitSchedule:
    """A schedule that runs the full network at exactly these step indices (step 0 always)."""
    values = list(steps)
    for s in values:
        _check_int("each full step", s, 0)
    return ExplicitSchedule(frozenset(values))


@dataclass(frozen=True)
class CallableSchedule(Schedule):
    """``fn(step, total) -> bool`` decides; step 0 is full whatever it says.

    Example:
        >>> s = CallableSchedule(lambda step, total: step < 2 or step % 4 == 0)
        >>> s.full_steps(10)
        [0, 1, 4, 8]
    """

    fn: Callable[[int, int | None], bool]

    def __post_init__(self) -> None:
        if self.fn in _FACTORIES:
            raise TypeError(
                f"schedule=fxcache.{self.fn.__name__} is the schedule's factory, not a schedule: call it, "
                f"for example schedule=fxcache.{self.fn.__name__}({_FACTORIES[self.fn]})"
            )
        try:
            inspect.signature(self.fn).bind(0, None)
        except TypeError as exc:
            raise TypeError(
                f"a schedule function is called as fn(step, total) -> bool; {self.fn!r} cannot take those two "
                f"arguments ({exc})"
            ) from None
        except ValueError:
            pass  # no signature to check (some builtins): its answers are still checked

    def is_full(self, step: int, total: int | None = None) -> bool:
        if step == 0:
            return True
        answer = self.fn(step, total)
        if isinstance(answer, bool) or type(answer).__name__ == "bool_":  # numpy's bool too
            return bool(answer)
        raise TypeError(
            f"schedule function {self.fn!r} returned {answer!r} ({type(answer).__name__}) for step {step}; "
            "it must return True (full step) or False (shallow step)"
        )


ScheduleLike = Schedule | Callable[[int, int | None], bool]

# Factories passed where a schedule was meant (schedule=fxcache.uniform), with an example call.
_FACTORIES: dict[Callable[..., Schedule], str] = {
    uniform: "3",
    nonuniform: "3, center=15",
    full_steps: "[0, 1, 2, 4, 8]",
}

_NEEDS_TOTAL = (
    "{0!r} needs the number of denoising steps: pass total_steps= to fxcache.transform, or use "
    "fxcache.enable(pipe, ...), which reads it from the pipeline's scheduler"
)


def as_schedule(schedule: ScheduleLike) -> Schedule:
    """A :class:`Schedule` from a schedule or a ``(step, total) -> bool`` callable."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, type) and issubclass(schedule, Schedule):
        raise TypeError(
            f"schedule={schedule.__name__} is a class: pass an instance, or use fxcache.uniform(N) and friends"
        )
    if callable(schedule):
        return CallableSchedule(schedule)
    raise TypeError(
        f"schedule must be a fxcache schedule (uniform, nonuniform, full_steps) or a function "
        f"(step, total) -> bool, got {type(schedule).__name__}"
    )
