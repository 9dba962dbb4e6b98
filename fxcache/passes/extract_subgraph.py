"""The one helper every partition uses: a subgraph given its new inputs and its outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

__all__ = ["extract_subgraph", "finish_graph", "graph_outputs", "needed_nodes"]


def graph_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The flat list of nodes ``gm`` returns (a captured graph returns a flat tuple)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    ret = out.args[0]
    return list(ret) if isinstance(ret, (tuple, list)) else [ret]


def needed_nodes(outputs: Sequence[object], stop: Mapping[fx.Node, object] | set[fx.Node]) -> set[fx.Node]:
    """The nodes ``outputs`` depend on when the nodes in ``stop`` are given (``stop`` nodes excluded)."""
    # Reachability from the outputs, not fx's eliminate_dead_code: that one keeps every
    # nondeterministic op (aten.dropout, even with p=0) and all it depends on.
    seen: set[fx.Node] = set()
    todo = [o for o in outputs if isinstance(o, fx.Node)]
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def extract_subgraph(
    gm: fx.GraphModule, new_inputs: Mapping[fx.Node, str], outputs: Sequence[fx.Node]
) -> fx.GraphModule:
    """A GraphModule that computes ``outputs`` from ``gm``'s inputs plus ``new_inputs``.

    Every node in ``new_inputs`` becomes a placeholder (named by the mapping), appended after all of
    ``gm``'s placeholders, which are kept so that both halves of a split take the same leading
    arguments. Only the nodes the outputs need are copied; ``get_attr`` tensors are shared with
    ``gm``, never copied. The result returns a flat tuple.

    Pre: every node in ``new_inputs`` and ``outputs`` belongs to ``gm``. Post: ``gm`` is unchanged.

    Example:
        >>> import torch
        >>> from fxcache.capture import capture
        >>> cap = capture(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()), (torch.randn(2),), {})
        >>> relu = next(n for n in cap.gm.graph.nodes if "relu" in n.name)
        >>> tail = extract_subgraph(cap.gm, {relu: "cached"}, graph_outputs(cap.gm))
        >>> [n.op for n in tail.graph.nodes]
        ['placeholder', 'placeholder', 'call_function', 'output']
    """
    keep = needed_nodes(outputs, new_inputs)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
    for n, name in new_inputs.items():
        env[n] = graph.placeholder(name)
        env[n].meta = dict(n.meta)
    for n in gm.graph.nodes:
        if n in keep and n not in env and n.op != "output":
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return finish_graph(gm, graph, class_name=type(gm).__name__)


def finish_graph(root: torch.nn.Module | Mapping[str, Any], graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """The shared clean-up at the end of every graph edit: lint, bind attributes, recompile.

    ``get_attr`` targets are taken from ``root`` (a module or a name -> tensor mapping) by reference:
    tensors are shared, never copied.
    """
    graph.lint()
    out = fx.GraphModule(root, graph, class_name=class_name)
    out.recompile()
    return out
