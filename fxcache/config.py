"""The frozen, self-validating configuration behind :func:`fxcache.transform`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from fxcache.compile import CompileSpec, check_compile_spec
from fxcache.schedule import Schedule, ScheduleLike, as_schedule, uniform

__all__ = ["DEFAULT_MAX_PLANS", "CacheConfig", "check_total_steps"]

DEFAULT_MAX_PLANS = 8  # programs kept per module: enough for a server's usual mix of resolutions and batch sizes


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and when.

    Attributes:
        branch: which skip connection to cut, 0 being the shallowest. Its upper bound depends on the
            model and is checked when the model is first captured.
        interval: the uniform schedule's N: every N-th step of a generation is full. Default 3 when
            no ``schedule`` is given.
        schedule: any other schedule (``fxcache.nonuniform(...)``, ``fxcache.full_steps([...])``, or a
            function ``(step, total) -> bool``); mutually exclusive with ``interval``.
        total_steps: the number of steps in a generation, for schedules that need it when there is no
            pipeline to read it from.
        compile: compile the full and shallow graphs with torch.compile: ``True`` (default mode per
            device: CUDA graphs on CUDA), a mode name (``"max-autotune"``) or a dict of torch.compile
            arguments. ``False``/``None`` runs them eagerly.
        max_plans: how many programs (plan and compiled graphs, per input signature, branch and compile
            setting) a module keeps; the least recently used beyond it is dropped and built again if it
            is needed again. Default 8.

    Example:
        >>> CacheConfig(branch=0, interval=3).steps_schedule
        Uniform(interval=3)
        >>> CacheConfig(branch=-1)
        Traceback (most recent call last):
        ...
        ValueError: branch=-1 is out of range: branches are numbered from 0 (the shallowest skip connection)
    """

    branch: int = 0
    interval: int | None = None
    schedule: ScheduleLike | None = None
    total_steps: int | None = None
    compile: CompileSpec = False
    max_plans: int = DEFAULT_MAX_PLANS

    def __post_init__(self) -> None:
        if isinstance(self.branch, bool) or not isinstance(self.branch, int):
            raise TypeError(f"branch must be an int, got {type(self.branch).__name__} ({self.branch!r})")
        if self.branch < 0:
            raise ValueError(
                f"branch={self.branch} is out of range: branches are numbered from 0 (the shallowest skip connection)"
            )
        if self.interval is not None and self.schedule is not None:
            raise ValueError(
                f"give either interval={self.interval} or schedule={self.schedule!r}, not both: "
                "interval=N is shorthand for schedule=fxcache.uniform(N)"
            )
        _ = self.steps_schedule  # builds (and so validates) the schedule
        if self.total_steps is not None:
            if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
                raise ValueError(f"total_steps={self.total_steps!r} is invalid: it must be an int >= 1")
        if isinstance(self.max_plans, bool) or not isinstance(self.max_plans, int) or self.max_plans < 1:
            raise ValueError(
                f"max_plans={self.max_plans!r} is invalid: it must be an int >= 1 (the number of input signatures "
                f"whose graphs a module keeps; default {DEFAULT_MAX_PLANS})"
            )
        check_compile_spec(self.compile)

    @cached_property  # asked at every step: build it once (replace() makes a new config)
    def steps_schedule(self) -> Schedule:
        """The schedule in force: ``schedule`` as a :class:`Schedule`, else ``uniform(interval or 3)``."""
        if self.schedule is not None:
            return as_schedule(self.schedule)
        return uniform(3 if self.interval is None else self.interval)


def check_total_steps(config: CacheConfig) -> None:
    """Refuse a schedule that needs the number of steps when ``config`` does not give it.

    For a module with no pipeline to read the number from (:func:`fxcache.transform`).
    """
    if config.steps_schedule.needs_total and config.total_steps is None:
        raise ValueError(
            f"{config.steps_schedule!r} needs the number of denoising steps: pass total_steps= to "
            "fxcache.transform (or CachedModule.configure), or use fxcache.enable(pipe, ...), which reads it "
            "from the pipeline's scheduler"
        )
