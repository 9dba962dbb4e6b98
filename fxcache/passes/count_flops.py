"""Count the FLOPs of a graph, node by node, without running it on real data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "flops_by_node"]

aten = torch.ops.aten

# FlopCounterMode calls these formulas with the shapes of the op's tensor arguments (its shape_wrapper) and
# its other arguments as they are; each returns the FLOPs of one call (a multiply-add counts 2).


def _attention(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    # softmax(q k^T) v over (..., heads, L, d): 2·Lq·Lk·d_qk for the scores, 2·Lq·Lk·d_v for the weighted sum,
    # per batch and query head (key/value heads shared by several query heads cost the same per query head).
    *lead, lq, d_qk = query
    lk, d_v = key[-2], value[-1]
    return 2 * math.prod(lead) * lq * lk * (d_qk + d_v)


def _sdpa(query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return _attention(query, key, value)


def _in_out_projections(query: Sequence[int], key: Sequence[int], embed_dim: int) -> int:
    # q from the query's L tokens, k and v from the key's S tokens (one (E, 3E) matmul when all three are the
    # same tensor), then the (E, E) output projection over the L tokens.
    *lead, tokens_q, _ = query
    tokens_kv = key[-2]
    batch = math.prod(lead)
    return 2 * batch * embed_dim * embed_dim * (2 * tokens_q + 2 * tokens_kv)


def _mha_attention(query: Sequence[int], key: Sequence[int], embed_dim: int, num_heads: int) -> int:
    *lead, tokens_q, _ = query
    head_dim = embed_dim // num_heads
    heads = (*lead, num_heads, tokens_q, head_dim)
    return _attention(heads, (*lead, num_heads, key[-2], head_dim), heads)


def _native_mha(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], embed_dim: int, num_head: int,
    *args: Any, **kwargs: Any,
) -> int:  # fmt: skip
    return _in_out_projections(query, key, embed_dim) + _mha_attention(query, key, embed_dim, num_head)


def _encoder_layer(
    src: Sequence[int], embed_dim: int, num_heads: int, qkv_weight: Sequence[int], qkv_bias: Sequence[int],
    proj_weight: Sequence[int], proj_bias: Sequence[int], use_gelu: bool, norm_first: bool, eps: float,
    norm_weight_1: Sequence[int], norm_bias_1: Sequence[int], norm_weight_2: Sequence[int],
    norm_bias_2: Sequence[int], ffn_weight_1: Sequence[int], *args: Any, **kwargs: Any,
) -> int:  # fmt: skip
    # Self-attention, then the feed-forward block's two linears (E -> F -> E).
    *lead, tokens, _ = src
    feed_forward = 2 * 2 * math.prod(lead) * tokens * embed_dim * ffn_weight_1[0]
    return _native_mha(src, src, src, embed_dim, num_heads) + feed_forward


# Ops torch's own counter gives no formula: the CPU (and out-of-tree) fused attention kernels that
# scaled_dot_product_attention dispatches to, and the fused eager fast paths a capture keeps
# (fxcache.fast_paths). The GPU attention kernels are counted by torch's own formulas, the math fallback by
# its matmuls.
_FORMULAS: dict[Any, Any] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa,
    aten._native_multi_head_attention: _native_mha,
    aten._transformer_encoder_layer_fwd: _encoder_layer,
}


class _PerNodeFlops(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops[n.name] = int(self.counter.get_total_flops() - before)
        return out


def flops_by_node(gm: fx.GraphModule) -> dict[str, int]:
    """FLOPs of each node of ``gm`` (by node name), counted by torch's FlopCounterMode on fake tensors.

    Input shapes come from the placeholders' ``meta["val"]``; non-tensor placeholders get the value
    recorded there. Only matmul-like ops count, as in torch's own counter: convolutions, linear layers and
    attention. Attention counts 4·B·heads·Lq·Lk·head_dim per call (the scores and the weighted sum), also on
    the CPU kernel torch's counter leaves out, and in the fused ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` ops with their projections and feed-forward linears. One fake run serves
    every subgraph of ``gm``: sum the nodes it keeps.

    Pre: every tensor placeholder has ``meta["val"]``. Post: pure.

    Example:
        >>> import torch
        >>> from fxcache.capture import capture
        >>> q = torch.randn(2, 4, 16, 8)  # batch 2, 4 heads, 16 tokens, head dim 8
        >>> class Attend(torch.nn.Module):
        ...     def forward(self, q):
        ...         return torch.nn.functional.scaled_dot_product_attention(q, q, q)
        >>> flops_by_node(capture(Attend(), (q,), {}).gm)["scaled_dot_product_attention"]  # 4·2·4·16·16·8
        65536
    """
    with FakeTensorMode(allow_non_fake_inputs=True):
        args = []
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                val = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
            args.append(val)
        with FlopCounterMode(display=False, custom_mapping=_FORMULAS) as counter:
            interpreter = _PerNodeFlops(gm, counter)
            interpreter.run(*args)
    return interpreter.flops


def count_flops(gm: fx.GraphModule) -> int:
    """FLOPs of one call of ``gm``.

    Example:
        >>> import torch
        >>> from fxcache.capture import capture
        >>> count_flops(capture(torch.nn.Linear(4, 3, bias=False), (torch.randn(2, 4),), {}).gm)
        48
    """
    return sum(flops_by_node(gm).values())
