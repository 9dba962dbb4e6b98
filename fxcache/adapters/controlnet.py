"""ControlNet-aware shallow steps: on a cached step, run only the part of the ControlNet the U-Net reads.

A ControlNet pipeline calls ``pipe.controlnet`` and then ``pipe.unet`` at every step. The ControlNet
returns one residual per U-Net skip plus one for the mid block; the U-Net adds each to its skip. On a
shallow step the U-Net's shallow graph reads only the residuals of the skips above the cut
(:attr:`fxcache.CachePlan.shallow_inputs`): for branch 0, the first one. :func:`fxcache.enable` puts in
the pipeline's ``controlnet`` a :func:`view` of the ControlNet whose forward is a :class:`ControlNetStep`;
on a shallow step it runs a graph of the ControlNet pruned, by reachability, to those residuals, and
returns zeros (made once per signature, never read by the shallow U-Net) in place of the others. Full
steps run the ControlNet's own forward, untouched. The ControlNet object itself is never changed, so
another pipeline sharing it runs it plain; the pruned graphs are captured again at a generation's start
when the ControlNet changed (:func:`fxcache.watch.fingerprint`), as the U-Net's are.

The step decision is taken once per step, by whichever of the two modules runs first: the hook asks
the U-Net's :class:`~fxcache.runtime.CachedModule` to decide its *next* call now
(``decide_ahead``), which advances the step state exactly as that call would, and leaves the
decision pending; the U-Net's next call consumes it instead of deciding again. So the two cannot
disagree. The only case in which the U-Net would then need a full step (its inputs' signature
changed from the one whose feature is cached) raises, if the ControlNet was pruned for it.

This module does not import diffusers: it recognises a ControlNet's output by its structure
(``(down_block_res_samples, mid_block_res_sample)`` or an object with those two attributes) and
the U-Net's residual arguments by diffusers' keyword names.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxcache.capture import Captured, Signature, capture, flatten_call
from fxcache.errors import CaptureError
from fxcache.gate import TRACING
from fxcache.passes import extract_subgraph, graph_outputs
from fxcache.plan import CachePlan
from fxcache.runtime import _TimestepArg
from fxcache.watch import fingerprint

_TIMESTEP = _TimestepArg("timestep", 1)  # ControlNetModel.forward(sample, timestep, ...)

__all__ = ["ControlNetPlan", "ControlNetStep", "installed", "plain", "residuals_read", "view"]

DOWN, MID = "down_block_additional_residuals", "mid_block_additional_residual"


def residuals_read(unet_plan: CachePlan) -> tuple[tuple[bool, ...], bool] | None:
    """Which ControlNet residuals the shallow U-Net of ``unet_plan`` reads: (per down residual, mid).

    None when the U-Net was not given ControlNet residuals as diffusers passes them.
    """
    used = set(unet_plan.shallow_inputs)
    flags = [i in used for i in range(unet_plan.signature.spec.num_leaves)]
    _, kwargs = pytree.tree_unflatten(flags, unet_plan.signature.spec)
    down, mid = kwargs.get(DOWN), kwargs.get(MID)
    if not isinstance(down, (list, tuple)) or not all(isinstance(d, bool) for d in down) or not isinstance(mid, bool):
        return None
    return tuple(down), mid


class _Forward(torch.nn.Module):
    """``net``'s own class forward, whatever instance ``forward`` is installed on it (what is captured)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.training = net.training  # not .train(): that would set every submodule's mode

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.net).forward(self.net, *args, **kwargs)


def _output_positions(captured: Captured) -> tuple[list[int], int] | None:
    # Which flat output is down residual i and which the mid residual.
    n = len(graph_outputs(captured.gm))
    idx = captured.unflatten(list(range(n)))
    if isinstance(idx, (tuple, list)) and len(idx) == 2:
        down, mid = idx
    else:
        down, mid = getattr(idx, "down_block_res_samples", None), getattr(idx, "mid_block_res_sample", None)
    if not isinstance(down, (tuple, list)) or not isinstance(mid, int):
        return None
    return list(down), mid


@dataclass(frozen=True, eq=False)
class ControlNetPlan:
    """The ControlNet pruned to the residuals one shallow U-Net reads, for one input signature.

    Attributes:
        captured: the whole ControlNet, captured (:func:`fxcache.capture.capture`).
        graph: ``graph(*leaves)`` returns only the needed flat outputs, in order.
        needed: the flat output indices ``graph`` computes.
        filler: every flat output: None where ``graph`` computes it, else a zero tensor of its shape.
    """

    captured: Captured
    graph: fx.GraphModule
    needed: tuple[int, ...]
    filler: tuple[torch.Tensor | None, ...]

    @cached_property
    def flops_fraction(self) -> float:
        """FLOPs of the pruned ControlNet over those of the whole one (what a shallow step keeps; attention counted)."""
        flops = self.captured.node_flops
        total = sum(flops.values())
        kept = sum(flops[n.name] for n in self.graph.graph.nodes if n.op == "call_function")
        return kept / total if total else float("nan")

    def __call__(self, leaves: list[Any]) -> Any:
        flat = list(self.filler)
        for i, out in zip(self.needed, self.graph(*leaves), strict=True):
            flat[i] = out
        return self.captured.unflatten(flat)

    def __repr__(self) -> str:
        return (
            f"ControlNetPlan({len(self.needed)} of {len(self.filler)} outputs, shallow step "
            f"{100 * self.flops_fraction:.1f}% of the ControlNet's FLOPs)"
        )


def _prune(captured: Captured, reads: tuple[tuple[bool, ...], bool]) -> ControlNetPlan | None:
    positions = _output_positions(captured)
    down_read, mid_read = reads
    if positions is None or len(positions[0]) != len(down_read):
        return None
    down, mid = positions
    needed = tuple(sorted([d for d, r in zip(down, down_read, strict=True) if r] + ([mid] if mid_read else [])))
    outputs = graph_outputs(captured.gm)
    filler: list[torch.Tensor | None] = []
    for i, node in enumerate(outputs):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if i in needed:
            filler.append(None)
        elif isinstance(val, torch.Tensor):
            filler.append(torch.zeros(val.shape, dtype=val.dtype, device=val.device))
        else:
            return None  # an output that is not a tensor: leave the ControlNet whole
    graph = extract_subgraph(captured.gm, {}, [outputs[i] for i in needed])
    return ControlNetPlan(captured, graph, needed, tuple(filler))


def _lift_scales(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The call with Python-number timestep and ``conditioning_scale`` (a float or a list) as tensors.

    With ``control_guidance_start/end`` the pipeline passes a new float every step; as a constant of the
    captured graph that would mean a capture per value. A scale becomes a 0-dim float64 CPU tensor, which
    is how PyTorch itself wraps a Python number in an operation, so ``x * scale`` gives the same bits.
    """
    lifted = _TIMESTEP.lift(args, kwargs)
    if lifted is not None:
        args, kwargs = lifted
    scale = kwargs.get("conditioning_scale")

    def tensor(s: Any) -> Any:
        is_number = isinstance(s, (int, float)) and not isinstance(s, bool)
        return torch.tensor(float(s), dtype=torch.float64) if is_number else s

    if isinstance(scale, (list, tuple)):
        kwargs = {**kwargs, "conditioning_scale": type(scale)(tensor(s) for s in scale)}
    elif scale is not None:
        kwargs = {**kwargs, "conditioning_scale": tensor(scale)}
    return args, kwargs


@dataclass(eq=False, repr=False)
class ControlNetStep:
    """What the pipeline's ControlNet runs while :func:`fxcache.enable` is in force: full steps the whole ControlNet,
    shallow ones a pruned graph.

    It belongs to one enabled pipeline: it is the forward of that pipeline's :func:`view` of the ControlNet, and
    the ControlNet object itself is never changed (another pipeline sharing it runs it plain).

    Attributes:
        net: the ControlNet (``ControlNetModel`` or ``MultiControlNetModel``), left as it is.
        unet: the pipeline's U-Net module (``CachedModule`` with ``decide_ahead`` and ``in_pipeline``); while it is
            not the pipeline's ``unet`` (``swap_unet``), or the view not its ``controlnet``, the ControlNet runs
            whole and decides nothing.
        prune: False runs the whole ControlNet every step (the step decision is still shared).
        whole_calls, pruned_calls: how many calls ran the whole ControlNet (full steps, and shallow steps that
            read every residual) and how many a pruned graph.
    """

    net: torch.nn.Module
    unet: Any
    prune: bool = True
    whole_calls: int = 0
    pruned_calls: int = 0
    _captured: dict[Signature, Captured | None] = field(default_factory=dict)
    _plans: dict[tuple[Signature, Any], ControlNetPlan | None] = field(default_factory=dict)
    _fingerprint: Hashable | None = None  # the ControlNet as the captures saw it (fxcache.watch)

    def __repr__(self) -> str:
        return (
            f"ControlNetStep({type(self.net).__name__}, prune={self.prune}, whole_calls={self.whole_calls}, "
            f"pruned_calls={self.pruned_calls}, plans={list(self._plans.values())})"
        )

    @cached_property
    def _holder(self) -> _Forward:
        return _Forward(self.net)

    @property
    def plans(self) -> dict[tuple[Signature, Any], ControlNetPlan | None]:
        """The pruned ControlNets built so far, by (input signature, residuals read); None: not prunable."""
        return dict(self._plans)

    def serves(self, view: torch.nn.Module) -> bool:
        """Whether ``view`` is its pipeline's ``controlnet`` and the U-Net module its ``unet`` (else: run it plain)."""
        return bool(self.unet.in_pipeline(controlnet=view))

    def _check_net(self) -> None:
        """At a generation's start: drop the captures if the ControlNet changed since they were made."""
        if not self._captured:
            self._fingerprint = None
            return
        with TRACING.shared():  # never while a capture runs: torch.export patches modules as it traces
            current = fingerprint(self.net)
        if current != self._fingerprint:
            self._captured.clear()
            self._plans.clear()
            self._fingerprint = None

    def _plan(
        self, unet_plan: CachePlan | None, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[ControlNetPlan | None, list[Any]]:
        """The pruned ControlNet for a shallow step of ``unet_plan`` and this call's leaves; None: run it whole."""
        reads = residuals_read(unet_plan) if unet_plan is not None else None
        if reads is None or (all(reads[0]) and reads[1]):
            return None, []  # nothing to prune: run it whole
        holder = self._holder
        holder.training = self.net.training
        args, kwargs = _lift_scales(args, kwargs)
        leaves, sig = flatten_call(holder, args, kwargs)
        key = (sig, reads)
        if key in self._plans:
            self._plans[key] = self._plans.pop(key)  # most recently used last
        else:
            if sig not in self._captured:
                if self._fingerprint is None:
                    with TRACING.shared():
                        self._fingerprint = fingerprint(self.net)
                try:
                    self._captured[sig] = capture(holder, args, kwargs)
                except CaptureError:
                    self._captured[sig] = None  # not one graph: run it whole, as without pruning
            captured = self._captured[sig]
            self._plans[key] = _prune(captured, reads) if captured is not None else None
            self._bound(getattr(getattr(self.unet, "cache_config", None), "max_plans", None))
        return self._plans[key], leaves

    def _bound(self, limit: int | None) -> None:
        # As many pruned ControlNets as the U-Net keeps plans, least recently used dropped (and captures no
        # pruned ControlNet uses any more).
        while limit is not None and len(self._plans) > limit:
            del self._plans[next(iter(self._plans))]
        used = {sig for sig, _ in self._plans}
        for sig in [s for s in self._captured if s not in used]:
            del self._captured[sig]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        new_generation, full, unet_plan = self.unet.decide_ahead(args, kwargs)
        try:
            if new_generation:
                self._check_net()
            plan, leaves = self._plan(unet_plan, args, kwargs) if self.prune and not full else (None, [])
            if plan is None:
                self.whole_calls += 1
                return self.net.forward(*args, **kwargs)  # its own forward (or one hooked on it), bound to it
            self.unet.ahead_pruned()
            self.pruned_calls += 1
            return plan(leaves)
        except BaseException:
            self.unet.drop_ahead()
            raise


# -- the pipeline's own view of a ControlNet ------------------------------------------------------------------

_VIEW_CLASSES: dict[type, type] = {}  # ControlNet class -> its view class


def _view_forward(view: Any) -> Callable[..., Any]:
    step = view._fxcache_step
    return step if step.serves(view) else view.fxcache_net.forward


def _refuse_forward(view: Any, value: Any) -> None:
    raise AttributeError(
        "fxcache: pipe.controlnet is fxcache's view of the ControlNet while fxcache.enable(pipe) is in force; its "
        "forward cannot be replaced. Set it on the ControlNet itself (pipe.controlnet.fxcache_net.forward = ...), "
        "or call fxcache.disable(pipe) first and fxcache.enable(pipe) after."
    )


def _reduce_to_net(view: Any, protocol: Any) -> Any:
    return view.fxcache_net.__reduce_ex__(protocol)  # a copy (or pickle) of the view is one of the plain ControlNet


def _view_class(cls: type) -> type:
    view_cls = _VIEW_CLASSES.get(cls)
    if view_cls is None:
        namespace = {
            "__slots__": ("fxcache_net", "_fxcache_step"),  # the view's own: not in the shared __dict__
            "__module__": cls.__module__,
            "__doc__": f"fxcache's view of a {cls.__name__}: see fxcache.adapters.controlnet.view.",
            "forward": property(_view_forward, _refuse_forward),
            "__reduce_ex__": _reduce_to_net,
        }
        view_cls = _VIEW_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return view_cls


def view(net: torch.nn.Module, step: ControlNetStep) -> torch.nn.Module:
    """A view of ``net`` whose forward is ``step``: what :func:`fxcache.enable` puts in the pipeline's ``controlnet``.

    Pipelines check ``isinstance(pipe.controlnet, ControlNetModel)`` (or ``MultiControlNetModel``), and another
    pipeline may share the ControlNet object, so the view is an instance of a subclass of ``net``'s class whose
    ``__dict__`` *is* ``net``'s: parameters, submodules, config, ``training``, hooks and every attribute are the
    ControlNet's own, live, both ways. Only ``forward`` differs: ``step`` while the view is its pipeline's
    ``controlnet`` (and the U-Net module its ``unet``), else ``net``'s own. ``net`` itself is never changed.
    ``view.fxcache_net`` is ``net``; copying or pickling the view gives a copy of ``net``.
    """
    v = object.__new__(_view_class(type(net)))
    object.__setattr__(v, "__dict__", net.__dict__)
    object.__setattr__(v, "fxcache_net", net)
    object.__setattr__(v, "_fxcache_step", step)
    return v


def installed(net: Any) -> ControlNetStep | None:
    """The :class:`ControlNetStep` behind a pipeline's ControlNet (``installed(pipe.controlnet)``) while
    :func:`fxcache.enable` prunes it; None for anything else (a plain ControlNet, ``prune_controlnet=False``)."""
    return net._fxcache_step if type(net) in _VIEW_CLASSES.values() else None


def plain(net: Any) -> Any:
    """The ControlNet behind a :func:`view` (``net`` itself when it is not one)."""
    return net.fxcache_net if installed(net) is not None else net
