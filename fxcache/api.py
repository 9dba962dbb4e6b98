"""The public verb: ``fxcache.transform``."""

from __future__ import annotations

import torch

from fxcache.compile import CompileSpec
from fxcache.config import CacheConfig
from fxcache.runtime import CachedModule

__all__ = ["transform"]


def transform(
    model: torch.nn.Module, branch: int = 0, interval: int = 3, compile: CompileSpec = False
) -> CachedModule:
    """Make ``model`` run DeepCache: every ``interval``-th call in full, the others shallow.

    The model is captured as one graph at its first call (and again for each new input
    signature), cut at skip connection ``branch`` (0 = shallowest; see :func:`fxcache.explain`),
    and run as a full graph that also stores the deep feature and a shallow graph that reads it.

    ``model`` is not modified and its weights are shared, not copied: in-place updates to it show
    in the next call. Within a generation, call ``i`` is full iff ``i % interval == 0``; a new
    generation starts at the first call, after ``.reset()``, when the timestep (second positional
    argument or ``timestep=``) rises, and when the input shapes, dtypes or devices change.

    Args:
        model: any module whose forward is a U-Net-like network with long skip connections.
        branch: which skip to cut; checked against the model at the first call.
        interval: the uniform schedule's N (1 = no caching).
        compile: compile the full and shallow graphs with torch.compile (Inductor): ``True`` for the
            default mode per device (``"reduce-overhead"``, i.e. CUDA graphs, on CUDA), a mode name,
            or a dict of torch.compile arguments. Wrapping the result in your own ``torch.compile``
            also works: the step logic stays out of Dynamo and the two graphs are compiled once each.

    Raises:
        ValueError: ``branch < 0``, ``interval < 1`` or an unknown compile mode (now); ``branch`` too large or no skip
            connection (at the first call).
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
    return CachedModule(model, CacheConfig(branch=branch, interval=interval, compile=compile))
