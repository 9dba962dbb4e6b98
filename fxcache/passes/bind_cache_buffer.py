"""Give a full/shallow pair one persistent cache buffer instead of a graph output and input."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxcache.passes.extract_subgraph import finish_graph

__all__ = ["bind_cache_buffer", "CACHE_BUFFER"]

CACHE_BUFFER = "fxcache_cache"


def bind_cache_buffer(
    full: fx.GraphModule, shallow: fx.GraphModule, buffer: torch.Tensor
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Make ``full`` write the deep feature into ``buffer`` in place and ``shallow`` read it from there.

    Under CUDA graphs a graph's outputs are overwritten by its next replay, and mutating an input
    that came from eager code makes the graph skip CUDA graphs. A buffer allocated before compiling
    and registered on both modules avoids both: it has a fixed address, and buffers may be mutated.

    Pre: ``full`` returns ``(*outputs, deep)`` and ``shallow``'s last placeholder is the cached deep
    tensor, as :func:`split_at_branch` makes them; ``buffer`` has deep's shape, dtype and device.
    Post: new modules; ``full(*inputs)`` returns ``outputs`` after ``buffer.copy_(deep)``, and
    ``shallow(*inputs)`` returns ``outputs`` computed from ``buffer``. The inputs are not modified.

    Example:
        >>> import torch
        >>> from fxcache.capture import capture
        >>> from fxcache.passes import find_skip_merges, split_at_branch
        >>> class Skip(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.down = torch.nn.Conv2d(2, 2, 3, stride=2, padding=1)
        ...     def forward(self, x):
        ...         return x + torch.nn.functional.interpolate(self.down(x), scale_factor=2.0)
        >>> x = torch.randn(1, 2, 4, 4)
        >>> gm = capture(Skip(), (x,), {}).gm
        >>> buf = torch.zeros(1, 2, 4, 4)
        >>> full, shallow = bind_cache_buffer(*split_at_branch(gm, find_skip_merges(gm)[0]), buf)
        >>> out = full(x)
        >>> bool(buf.abs().sum() > 0), torch.equal(shallow(x)[0], out[0])
        (True, True)
    """
    full_graph, shallow_graph = _copy_graph(full), _copy_graph(shallow)

    out = next(n for n in reversed(full_graph.nodes) if n.op == "output")
    *outputs, deep = out.args[0]
    with full_graph.inserting_before(out):
        buf = full_graph.get_attr(CACHE_BUFFER)
        write = full_graph.call_function(torch.ops.aten.copy_.default, (buf, deep))
        write.meta = dict(deep.meta)
    out.args = (tuple(outputs),)

    cached = [n for n in shallow_graph.nodes if n.op == "placeholder"][-1]
    with shallow_graph.inserting_after(cached):
        buf = shallow_graph.get_attr(CACHE_BUFFER)
        buf.meta = dict(cached.meta)
    cached.replace_all_uses_with(buf)
    shallow_graph.erase_node(cached)

    return _with_buffer(full, full_graph, buffer), _with_buffer(shallow, shallow_graph, buffer)


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph


def _with_buffer(root: fx.GraphModule, graph: fx.Graph, buffer: torch.Tensor) -> fx.GraphModule:
    holder = torch.nn.Module()
    for name, p in root.named_parameters(recurse=False):
        holder.register_parameter(name, p)
    for name, b in root.named_buffers(recurse=False):
        holder.register_buffer(name, b)
    holder.register_buffer(CACHE_BUFFER, buffer)
    return finish_graph(holder, graph, class_name=type(root).__name__)
