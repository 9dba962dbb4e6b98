"""The public verb: ``fxcache.transform``."""

from __future__ import annotations

import torch

from fxcache.compile import CompileSpec
from fxcache.config import DEFAULT_MAX_PLANS, CacheConfig, check_total_steps
from fxcache.runtime import CachedModule
from fxcache.schedule import ScheduleLike

__all__ = ["transform"]


def transform(
    model: torch.nn.Module,
    branch: int = 0,
    interval: int | None = None,
    *,
    schedule: ScheduleLike | None = None,
    total_steps: int | None = None,
    compile: CompileSpec = False,
    max_plans: int = DEFAULT_MAX_PLANS,
) -> CachedModule:
    """Make ``model`` run DeepCache: full steps on a schedule, shallow steps in between.

    The model is captured as one graph at its first call (and again for each new input
    signature), cut at skip connection ``branch`` (0 = shallowest; see :func:`fxcache.explain`),
    and run as a full graph that also stores the deep feature and a shallow graph that reads it.

    ``model`` is not modified and its weights are shared, not copied: in-place updates to it show
    in the next call. With ``interval=N`` (default 3), call ``i`` of a generation is full iff
    ``i % N == 0``. A new generation starts at the first call, after ``.reset()``, when the timestep
    (the ``forward`` parameter named ``timestep``, ``t``, ``sigma``..., else the second positional one)
    rises, and when the input shapes, dtypes or devices change; a call at the previous call's timestep
    is the same step and repeats its decision (:func:`fxcache.runtime.generation_rule`). A bare module
    counts its steps, :func:`fxcache.enable` numbers them as the pipeline does. Changes to the model
    (modules, parameter objects, hooks, attention processors) are noticed at the start of each
    generation and captured again; ``drop_graphs()`` is for the changes fxcache cannot see.

    Args:
        model: any module whose forward is a U-Net-like network with long skip connections.
        branch: which skip to cut; checked against the model at the first call.
        interval: the uniform schedule's N (1 = no caching). Shorthand for ``schedule=fxcache.uniform(N)``.
        schedule: another schedule: ``fxcache.nonuniform(N, center, power)``, ``fxcache.full_steps([...])``
            or a function ``(step, total) -> bool``. Step 0 is always full.
        total_steps: steps per generation, for schedules that need it (``nonuniform``).
        compile: compile the full and shallow graphs with torch.compile (Inductor): ``True`` for the
            default mode per device (``"reduce-overhead"``, i.e. CUDA graphs, on CUDA), a mode name,
            or a dict of torch.compile arguments. Wrapping the result in your own ``torch.compile``
            also works: the step logic stays out of Dynamo and the two graphs are compiled once each.
        max_plans: how many input signatures' graphs to keep (least recently used dropped beyond it).

    Raises:
        TypeError: now, for a model that is already a :class:`CachedModule` (use ``configure``) or a
            schedule that is not one (``schedule=fxcache.uniform`` uncalled, a function that cannot
            take ``(step, total)``).
        ValueError: now, for ``branch < 0``, ``interval < 1``, both ``interval`` and ``schedule``, a
            schedule that needs ``total_steps`` without it, or an unknown compile mode; at the first
            call, for a ``branch`` beyond the model's skips or a model with no skip connection.
        fxcache.CaptureError: the model cannot be captured as one graph (at the first call).

    Example:
        >>> import torch, fxcache
        >>> class UNetish(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.down = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        ...         self.up = torch.nn.Upsample(scale_factor=2)
        ...     def forward(self, x, t):
        ...         return x + self.up(self.down(x)) * t
        >>> net = UNetish()
        >>> cached = fxcache.transform(net, branch=0, interval=3)
        >>> x = torch.randn(1, 4, 8, 8)
        >>> outs = [cached(x, torch.tensor(t)) for t in (3.0, 2.0, 1.0)]
        >>> torch.equal(outs[0], net(x, torch.tensor(3.0)))  # step 0 is full: exact
        True
    """
    config = CacheConfig(
        branch=branch,
        interval=interval,
        schedule=schedule,
        total_steps=total_steps,
        compile=compile,
        max_plans=max_plans,
    )
    check_total_steps(config)
    return CachedModule(model, config)
