"""Stage 1: capture a model as one flat torch.fx graph.

The capture uses ``torch.export.export(..., strict=False)`` (see docs/design.md for why) and then
rewrites the exported graph into a plain :class:`torch.fx.GraphModule` whose

* placeholders are the flattened call arguments, in ``torch.utils._pytree`` order, non-tensor
  leaves (``None``, ``return_dict=False``) included, so a caller passes exactly the leaves it has;
* parameters and buffers are ``get_attr`` nodes bound to the *user's own* tensors: nothing is
  copied, so an in-place weight update on the original model shows in the next call;
* output is the flat tuple of output leaves, rebuilt into the model's output type with ``out_spec``.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from fxcache.errors import CaptureError, add_note
from fxcache.fast_paths import eager_fast_paths
from fxcache.gate import TRACING
from fxcache.passes.count_flops import flops_by_node
from fxcache.passes.extract_subgraph import finish_graph

__all__ = ["Captured", "Signature", "capture", "flatten_call"]


@dataclass(frozen=True)
class Signature:
    """What a captured graph is specialised on: argument structure, tensor metadata, constants."""

    spec: pytree.TreeSpec
    leaves: tuple[Hashable, ...]
    training: bool
    # Gradient mode of the call. PyTorch's fused eager fast paths (nn.MultiheadAttention's) are taken only
    # when no gradient is needed, so a graph captured for one grad mode may not compute what eager computes
    # in the other; each is captured under its own (see fxcache.fast_paths).
    grad: bool = False
    # Autocast regions the call runs in, as (device type, dtype): a capture under autocast bakes its casts into
    # the graph, which a call outside autocast must not run (nor the other way round).
    autocast: tuple[tuple[str, torch.dtype], ...] = ()


def _describe_leaf(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.layout)
    try:
        hash(leaf)
    except TypeError:
        return ("object", type(leaf), id(leaf))
    return ("const", type(leaf), leaf)


def flatten_call(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> tuple[list[Any], Signature]:
    """Flatten call arguments into leaves and the :class:`Signature` they are specialised on.

    Keyword arguments are sorted by name so that the same call written in another order maps to the
    same capture.
    """
    leaves, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
    described = tuple(_describe_leaf(x) for x in leaves)
    return leaves, Signature(spec, described, model.training, torch.is_grad_enabled(), _autocast(described))


def _autocast(described: tuple[Hashable, ...]) -> tuple[tuple[str, torch.dtype], ...]:
    devices = {"cpu", "cuda"} | {d[3].type for d in described if d[0] == "tensor"}
    return tuple((d, torch.get_autocast_dtype(d)) for d in sorted(devices) if torch.is_autocast_enabled(d))


@dataclass
class Captured:
    """A model captured for one :class:`Signature`.

    Attributes:
        gm: the graph; call it as ``gm(*leaves)`` with the leaves from :func:`flatten_call`.
        out_spec: turns the flat outputs of ``gm`` back into what the model returns.
        attr_fqns: for every ``get_attr`` target of ``gm``, the name of the model's parameter or buffer
            it is bound to (tensor constants made during tracing are not listed: they belong to the graph).
    """

    gm: fx.GraphModule
    out_spec: pytree.TreeSpec
    attr_fqns: dict[str, str]

    def unflatten(self, flat_out: Any) -> Any:
        return pytree.tree_unflatten(list(flat_out), self.out_spec)

    @cached_property
    def node_flops(self) -> dict[str, int]:
        """FLOPs of each node of ``gm`` by name (one fake-tensor run, on first use; shared by every cut)."""
        return flops_by_node(self.gm)


def _raise_if_the_call_is_wrong(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """After a failed export: raise the call's own error if the model, run as it is, refuses these inputs.

    A missing or unexpected argument, or inputs the model rejects (an empty batch, a wrong shape), are
    the caller's to fix, not capture problems; they are reported as the model reports them.
    """
    name = type(model).__name__
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}.forward cannot take this call: {exc}. The model was not modified.") from None
    except ValueError:
        pass  # no Python signature to check against
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as own:
        add_note(own, f"fxcache: {name} raises this itself on these inputs (run without fxcache); fix the call.")
        raise


def _export(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    # Under the caller's grad mode, with PyTorch's eager fast paths open to the trace: the graph then holds
    # the same kernels eager runs for this call (a fused attention under no_grad), so it matches it bit for bit.
    try:
        with eager_fast_paths(model):
            return torch.export.export(model, tuple(args), dict(sorted(kwargs.items())), strict=False)
    except CaptureError:
        raise  # already says what fxcache cannot capture and why (fxcache.fast_paths)
    except Exception as exc:  # torch.export raises many types; all mean "not one graph"...
        _raise_if_the_call_is_wrong(model, args, kwargs)  # ...unless the model itself refuses the call
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CaptureError(
            f"fxcache could not capture {type(model).__name__} as one graph with "
            f"torch.export.export(strict=False): {type(exc).__name__}: {first_line}\n"
            "DeepCache needs the whole forward as a single graph. Common causes are Python control "
            "flow on tensor values (if x.sum() > 0), .item()/.tolist() calls, and unsupported "
            "custom ops. Your model was not modified. See the chained exception for where tracing stopped."
        ) from exc


def _mutates(ep: torch.export.ExportedProgram) -> bool:
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        for n in ep.graph.nodes
    )


def _functional(ep: torch.export.ExportedProgram, model: torch.nn.Module) -> torch.export.ExportedProgram:
    # torch.export's graph keeps in-place ops on intermediate tensors (FreeU scales half the channels of a
    # feature map with a slice assignment). Cutting such a graph by reachability would drop the mutation,
    # which no later node consumes, so such graphs are functionalized first (the same ATen ops, out of
    # place, no decompositions). Graphs without in-place ops (SD, SD-XL U-Nets) skip the retrace.
    if not _mutates(ep):
        return ep
    try:
        return ep.run_decompositions({})
    except Exception as exc:
        raise CaptureError(
            f"fxcache captured {type(model).__name__} but could not make its in-place operations functional "
            f"(ExportedProgram.run_decompositions({{}})): {type(exc).__name__}: {exc}"
        ) from exc


def capture(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Captured:
    """Capture ``model(*args, **kwargs)`` as one flat GraphModule bound to the model's own tensors.

    Pre: ``model`` runs on ``args``/``kwargs``. Post: ``Captured.gm(*flatten_call(...)[0])`` computes
    the same ATen ops in the same order as ``model`` would under the current grad mode (fused eager fast paths
    included, see :mod:`fxcache.fast_paths`), and ``model`` is unchanged.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> cap = capture(lin, (torch.ones(1, 2),), {})
        >>> name = next(a for a, fqn in cap.attr_fqns.items() if fqn == "weight")
        >>> getattr(cap.gm, name) is lin.weight  # shared, not copied
        True

    Raises:
        CaptureError: the model cannot be captured as one graph.
    """
    with TRACING.exclusive():  # export traces process-wide: no fxcache graph runs in other threads meanwhile
        ep = _functional(_export(model, tuple(args), dict(kwargs)), model)
    sig = ep.graph_signature
    extra_outputs = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if extra_outputs:
        kinds = sorted({s.kind.name for s in extra_outputs})
        raise CaptureError(
            f"{type(model).__name__}.forward mutates state ({', '.join(kinds)}), for example BatchNorm "
            "running statistics in training mode. Call model.eval() first; fxcache caches inference only."
        )

    live: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers(remove_duplicate=False))

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, Any] = {}
    attr_fqns: dict[str, str] = {}
    specs = {s.arg.name: s for s in sig.input_specs}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                new = graph.placeholder(node.name)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                name = node.name
                attrs[name] = live[spec.target] if spec.target in live else ep.state_dict[spec.target]
                attr_fqns[name] = spec.target
                new = graph.get_attr(name)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                attrs[node.name] = ep.constants[spec.target]
                new = graph.get_attr(node.name)
            else:
                raise CaptureError(
                    f"{type(model).__name__} uses a {spec.kind.name} input ({spec.target}), which fxcache "
                    "cannot bind to a plain graph yet. Please report the model."
                )
        else:
            new = graph.node_copy(node, lambda n: env[n])
        new.meta = dict(node.meta)
        env[node] = new

    gm = finish_graph(attrs, graph, class_name=f"Captured{type(model).__name__}")
    return Captured(gm=gm, out_spec=ep.call_spec.out_spec, attr_fqns=attr_fqns)
