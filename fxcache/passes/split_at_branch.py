"""Cut a captured graph at one skip merge into a full graph and a shallow graph."""

from __future__ import annotations

import torch.fx as fx

from fxcache.passes.extract_subgraph import extract_subgraph, graph_outputs
from fxcache.passes.find_skip_merges import SkipMerge

__all__ = ["split_at_branch", "CACHE_INPUT"]

CACHE_INPUT = "fxcache_cached_feature"


def split_at_branch(gm: fx.GraphModule, merge: SkipMerge) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The full and shallow graphs for one branch.

    * full: ``(*inputs) -> (*outputs, deep)``: the original computation, also returning the deep
      tensor that enters ``merge`` (the feature to cache).
    * shallow: ``(*inputs, deep) -> (*outputs)``: only what the outputs need once ``deep`` is given.

    Pre: ``merge`` was found in ``gm`` by :func:`find_skip_merges`. Post: ``gm`` is unchanged; both
    results share its parameters.

    Example:
        >>> import torch
        >>> from fxcache.capture import capture
        >>> from fxcache.passes import find_skip_merges
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, stride=2, padding=1), torch.nn.Upsample(scale_factor=2))
        >>> class Skip(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.body = net
        ...     def forward(self, x):
        ...         return x + self.body(x)
        >>> gm = capture(Skip(), (torch.randn(1, 2, 4, 4),), {}).gm
        >>> full, shallow = split_at_branch(gm, find_skip_merges(gm)[0])
        >>> any("conv" in str(n.target) for n in shallow.graph.nodes)
        False
    """
    outputs = graph_outputs(gm)
    full = extract_subgraph(gm, {}, [*outputs, merge.deep])
    shallow = extract_subgraph(gm, {merge.deep: CACHE_INPUT}, outputs)
    return full, shallow
