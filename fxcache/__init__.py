"""fxcache: DeepCache as a compiler-level graph transform.

``fxcache.transform(unet, branch=0, interval=3)`` captures a U-Net as one torch.fx graph, finds its
skip connections, cuts it at the chosen one into a full and a shallow graph, and runs them on
DeepCache's schedule. ``fxcache.enable(pipe, ...)`` does the same for a diffusers pipeline's UNet.
``fxcache.plan(model, args, kwargs, branch=0)`` is the build step on its own: a :class:`CachePlan`.
``fxcache.export(cached, "unet.pt2", args, kwargs)`` compiles both graphs ahead of time into one package,
and ``fxcache.load("unet.pt2")`` runs it without the model's code.

Importing fxcache imports neither diffusers nor CUDA.
"""

from __future__ import annotations

from fxcache._version import __version__
from fxcache.adapters.diffusers import disable, enable  # duck-typed: does not import diffusers
from fxcache.api import transform
from fxcache.config import CacheConfig
from fxcache.errors import CaptureError
from fxcache.explain import Branch, BranchTable, explain
from fxcache.export import PackagedModule, PackageError, export, load
from fxcache.plan import CachePlan, CacheSpec, plan
from fxcache.runtime import CachedModule
from fxcache.schedule import Schedule, full_steps, nonuniform, uniform

__all__ = [
    "Branch",
    "BranchTable",
    "CacheConfig",
    "CachePlan",
    "CacheSpec",
    "CachedModule",
    "CaptureError",
    "PackageError",
    "PackagedModule",
    "Schedule",
    "disable",
    "enable",
    "explain",
    "export",
    "full_steps",
    "load",
    "nonuniform",
    "plan",
    "transform",
    "uniform",
]

