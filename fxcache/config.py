"""The frozen, self-validating configuration behind :func:`fxcache.transform`."""

from __future__ import annotations

from dataclasses import dataclass

from fxcache.compile import CompileSpec, check_compile_spec
from fxcache.schedule import Schedule, uniform

__all__ = ["CacheConfig"]


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and when.

    Attributes:
        branch: which skip connection to cut, 0 being the shallowest. Its upper bound depends on the
            model and is checked when the model is first captured.
        interval: the uniform schedule's N: every N-th step of a generation is full.
        compile: compile the full and shallow graphs with torch.compile: ``True`` (default mode per
            device: CUDA graphs on CUDA), a mode name (``"max-autotune"``) or a dict of torch.compile
            arguments. ``False``/``None`` runs them eagerly.

    Example:
        >>> CacheConfig(branch=0, interval=3).schedule.is_full(3)
        True
        >>> CacheConfig(branch=-1)
        Traceback (most recent call last):
        ...
        ValueError: branch=-1 is out of range: branches are numbered from 0 (the shallowest skip connection)
    """

    branch: int = 0
    interval: int = 3
    compile: CompileSpec = False

    def __post_init__(self) -> None:
        if isinstance(self.branch, bool) or not isinstance(self.branch, int):
            raise TypeError(f"branch must be an int, got {type(self.branch).__name__} ({self.branch!r})")
        if self.branch < 0:
            raise ValueError(
                f"branch={self.branch} is out of range: branches are numbered from 0 (the shallowest skip connection)"
            )
        uniform(self.interval)  # validates interval with the schedule's own message
        check_compile_spec(self.compile)

    @property
    def schedule(self) -> Schedule:
        """The schedule this config stands for."""
        return uniform(self.interval)
