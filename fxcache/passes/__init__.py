"""Graph passes, one per file: find_skip_merges, extract_subgraph, split_at_branch, bind_cache_buffer,
count_flops."""

from fxcache.passes.bind_cache_buffer import bind_cache_buffer
from fxcache.passes.count_flops import count_flops, flops_by_node
from fxcache.passes.extract_subgraph import extract_subgraph, finish_graph, graph_outputs, needed_nodes
from fxcache.passes.find_skip_merges import SkipMerge, find_skip_merges
from fxcache.passes.split_at_branch import split_at_branch

__all__ = [
    "SkipMerge",
    "bind_cache_buffer",
    "count_flops",
    "extract_subgraph",
    "finish_graph",
    "find_skip_merges",
    "flops_by_node",
    "graph_outputs",
    "needed_nodes",
    "split_at_branch",
]
