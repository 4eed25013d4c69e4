"""Per-shard compute behind ring_attn: blockwise attention forward/backward and the blockwise
feedforward, with one contract for every implementation (see `backend`)."""

from pallas_kernels.backend import IMPLS, Impl, Kernel, attention_bwd, attention_fwd, feedforward, resolve_impl
from pallas_kernels.block_sizes import DEFAULT_BLOCK, BlockSizes, fit_block_sizes
from pallas_kernels.common import match_vma

__all__ = [
    "BlockSizes", "DEFAULT_BLOCK", "IMPLS", "Impl", "Kernel", "attention_bwd", "attention_fwd",
    "feedforward", "fit_block_sizes", "match_vma", "resolve_impl",
]
