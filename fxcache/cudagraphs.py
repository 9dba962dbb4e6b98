"""fxcache's own CUDA graphs: each compiled graph recorded once per input signature and replayed directly.

Inductor's ``mode="reduce-overhead"`` (CUDA graph trees) checks guards and tree state at every call. Measured on
an H200 with the SD1.5 architecture (benchmarks/RESULTS.md, section 4), that host work was 275 us per shallow
step against 580 us of GPU time: 47%, while the pipeline syncs every step, so it is paid in full. fxcache already
knows everything the trees check for: one signature per program (static shapes), weights and the cache buffer at
fixed addresses, and a step order it decides itself. So it records one ``torch.cuda.CUDAGraph`` per graph and
replays it: per call, one copy into each static input, the replay, and a clone of each output (the next replay
overwrites the static outputs). Dynamo and the trees are not on that path at all.

Opt-in (``compile={"cudagraphs": True}``) and not yet run on a GPU: the GPU machine was withdrawn before the check
that measures it against the trees (``bash benchmarks/gpu_check.sh``, method "fxcache compiled (own graphs)") could
run. ``compile=True`` keeps the trees, which that check measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CUDAGraphRunner"]


class CUDAGraphRunner:
    """Call ``fn`` (a compiled graph taking flat leaves) through a CUDA graph recorded at its first call.

    The first call runs ``fn`` twice on a side stream (compiling it and initialising cuBLAS/cuDNN workspaces),
    records it into a graph whose inputs are static copies of the tensor leaves, and replays. Later calls copy
    their tensor leaves into those static inputs and replay; non-tensor leaves are part of the signature, so they
    do not change. Calls that cannot be replayed run ``fn`` directly: with gradients enabled (a graph would cut
    autograd), or with a tensor leaf off the graph's CUDA device (a CPU scalar would be baked in at recording).

    Example (needs CUDA):
        >>> runner = CUDAGraphRunner(torch.compile(torch.nn.Linear(4, 4).cuda()))  # doctest: +SKIP
        >>> with torch.no_grad():                                                     # doctest: +SKIP
        ...     y = runner(torch.randn(2, 4, device="cuda"))
    """

    def __init__(self, fn: Callable[..., Any], pool: Any = None) -> None:
        self.fn = fn
        self.pool = pool  # a memory pool shared with the other graph of the same program
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[Any] = []
        self.static_out: Any = None
        self.recordings = 0

    def _replayable(self, leaves: tuple[Any, ...]) -> bool:
        if torch.is_grad_enabled():
            return False
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        return bool(tensors) and all(x.is_cuda for x in tensors)

    def _record(self, leaves: tuple[Any, ...]) -> None:
        # Static inputs are ordinary tensors even when the first call runs under inference_mode, so later calls
        # outside it can still copy into them.
        with torch.inference_mode(False), torch.no_grad():
            static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*static)
        self.graph, self.static_in, self.static_out = graph, static, out
        self.recordings += 1

    def __call__(self, *leaves: Any) -> Any:
        if not self._replayable(leaves):
            return self.fn(*leaves)
        if self.graph is None:
            self._record(leaves)  # the static inputs start as copies of this call's leaves
        else:
            for dst, src in zip(self.static_in, leaves, strict=True):
                if isinstance(dst, torch.Tensor) and dst is not src:
                    dst.copy_(src)
        assert self.graph is not None
        self.graph.replay()
        return _clone(self.static_out)


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out
