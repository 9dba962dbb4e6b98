"""Which denoising steps run the full network.

A schedule is policy only: it answers, for step ``i`` of a generation, whether that step is full.
How a full or a shallow step is executed lives in :mod:`fxcache.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule", "uniform"]


@dataclass(frozen=True)
class Schedule:
    """DeepCache's uniform 1:N schedule: step ``i`` is full iff ``i % interval == 0``.

    Step 0 of every generation is therefore always full.

    Example:
        >>> s = uniform(3)
        >>> [i for i in range(10) if s.is_full(i)]
        [0, 3, 6, 9]
    """

    interval: int

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int):
            raise TypeError(f"interval must be an int, got {type(self.interval).__name__} ({self.interval!r})")
        if self.interval < 1:
            raise ValueError(
                f"interval={self.interval} is invalid: it must be >= 1 "
                "(1 runs every step in full, N runs one full step then N-1 cached steps)"
            )

    def is_full(self, step: int) -> bool:
        """True when step ``step`` (0-based, within a generation) must run the whole network."""
        return step % self.interval == 0


def uniform(interval: int) -> Schedule:
    """The paper's uniform schedule: one full step, then ``interval - 1`` shallow steps.

    Example:
        >>> uniform(5).is_full(5), uniform(5).is_full(6)
        (True, False)
    """
    return Schedule(interval)
