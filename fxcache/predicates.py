"""Small named predicates over ATen-level fx nodes, kept in one place.

Shapes come from ``node.meta["val"]`` (set by torch.export); no predicate parses node names.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

__all__ = ["is_concat", "is_add", "is_downsample", "tensor_meta", "module_path", "merge_site"]

# Ops whose spatial output can be smaller than their spatial input. Attention reshapes are not
# listed on purpose: their (batch, heads, tokens, head_dim) tensors can look "smaller" than a
# feature map, and counting them would turn transformer residuals into long skips.
_SPATIAL_OPS = frozenset(
    {
        "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
        "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "pixel_unshuffle",
    }
)  # fmt: skip


def _packet_name(node: fx.Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return node.target.overloadpacket.__name__


def tensor_meta(node: object) -> torch.Tensor | None:
    """The (fake) tensor a node produces, or None when it is not a single tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val:
        val = val[0]
    return val if isinstance(val, torch.Tensor) else None


def is_concat(node: fx.Node) -> bool:
    """``aten.cat`` of exactly two tensors: the only concatenation that can merge one skip."""
    if _packet_name(node) != "cat":
        return False
    tensors = node.args[0]
    return isinstance(tensors, (list, tuple)) and len(tensors) == 2 and all(isinstance(t, fx.Node) for t in tensors)


def is_add(node: fx.Node) -> bool:
    """A tensor-tensor ``aten.add`` (the candidate additive skip merge)."""
    return (
        _packet_name(node) == "add"
        and len(node.args) >= 2
        and isinstance(node.args[0], fx.Node)
        and isinstance(node.args[1], fx.Node)
    )


def is_downsample(node: fx.Node) -> bool:
    """A convolution or pooling whose output has fewer spatial positions than its input."""
    if _packet_name(node) not in _SPATIAL_OPS:
        return False
    out, inp = tensor_meta(node), tensor_meta(node.args[0] if node.args else None)
    if out is None or inp is None or out.dim() < 3 or out.dim() != inp.dim():
        return False
    return math.prod(out.shape[2:]) < math.prod(inp.shape[2:])


def module_path(node: fx.Node) -> str:
    """The innermost module a node was traced in (``"up_blocks.3"``), ``"<input>"`` for inputs."""
    if node.op == "placeholder":
        return "<input>"
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if v and v[0]]
    return paths[-1] if paths else "<top>"


def merge_site(node: fx.Node) -> str:
    """Where a skip merge rejoins, by module: the consumer one level further in when there is one.

    The cat/add runs in the block's own forward (``"up_blocks.3"``); the module that consumes the
    merged tensor (``"up_blocks.3.resnets.2"``) is more telling.
    """
    site = module_path(node)
    for user in node.users:
        paths = [v[0] for v in (user.meta.get("nn_module_stack") or {}).values() if v and v[0]]
        deeper = [p for p in paths if site in ("<top>", "<input>") or p.startswith(site + ".")]
        if deeper:
            return deeper[0]
    return site
