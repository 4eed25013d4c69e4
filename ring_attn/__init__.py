"""Exact attention over sequences sharded round a ring of devices.

RingAttention (Liu et al. 2023, arXiv 2310.01889) as used by the Large World Model (Liu et al.
2024, arXiv 2402.08268), with blockwise attention and feedforward (arXiv 2305.19370).
"""

from pallas_kernels import BlockSizes
from ring_attn import cost
from ring_attn.attention import ring_attention
from ring_attn.context import context_attention
from ring_attn.decode import cache_positions, ring_cache_update, ring_decode
from ring_attn.drop_in import dot_product_attention, flax_attention_fn
from ring_attn.feedforward import blockwise_feedforward
from ring_attn.layout import unzigzag, unzigzag_shard, zigzag, zigzag_shard
from ring_attn.sharded import ring_attention_global

__version__ = "0.1.0"

__all__ = [
    "BlockSizes",
    "blockwise_feedforward",
    "cache_positions",
    "context_attention",
    "cost",
    "dot_product_attention",
    "flax_attention_fn",
    "ring_attention",
    "ring_attention_global",
    "ring_cache_update",
    "ring_decode",
    "unzigzag",
    "unzigzag_shard",
    "zigzag",
    "zigzag_shard",
]
