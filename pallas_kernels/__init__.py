"""Per-shard compute behind ring_attn: blockwise attention forward/backward and the blockwise
feedforward, with one contract for every implementation (see `backend`)."""

from pallas_kernels.backend import (
    IMPLS,
    Impl,
    Kernel,
    PerPlatform,
    attention_bwd,
    attention_fwd,
    feedforward,
    kernels_for,
    resolve_impl,
    target_platform,
)
from pallas_kernels.block_sizes import DEFAULT_BLOCK, BlockSizes, fit_block_sizes
from pallas_kernels.common import match_vma
from pallas_kernels.sinks import fold_sinks, sinks_grad

__all__ = [
    "BlockSizes", "DEFAULT_BLOCK", "IMPLS", "Impl", "Kernel", "attention_bwd", "attention_fwd",
    "PerPlatform", "feedforward", "fit_block_sizes", "fold_sinks", "kernels_for", "match_vma", "resolve_impl",
    "sinks_grad", "target_platform",
]
