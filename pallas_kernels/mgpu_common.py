"""What the Mosaic GPU attention kernels (forward and backward) share: register loads across JAX
versions, the shared-memory budget their scratch must fit, the tiles a CTA streams, and the
per-tile-pair segment table that lets a kernel skip tiles of disjoint documents."""

import inspect
import math

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

# Shared memory one CTA may use on Hopper (H100 and H200: 227 KiB), which Mosaic GPU checks a
# kernel's scratch against; `ring_attn.aot.H100_SHARED_MEMORY_PER_BLOCK`.
SMEM_PER_BLOCK = 232448
# Mosaic GPU starts each shared-memory buffer on a 1 KiB boundary; an mbarrier takes 8 bytes.
SMEM_ALIGNMENT = 1024
BARRIER_BYTES = 8
# Streamed tiles in flight: a double buffer, unless only a single one fits (MLA's q/k 192 dk/dv).
NUM_SLOTS = 2


def load(ref, *, layout):
    """`plgpu.load` of a whole (already indexed) ref into registers of `layout`, uncoalesced where
    need be: JAX 0.10 requires the separate index argument, JAX 0.11 deprecates it, JAX 0.12 drops it."""
    idx = inspect.signature(plgpu.load).parameters.get("idx")
    if idx is not None and idx.default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def smem_bytes(scratch, *, reduces):
    """Shared memory Mosaic GPU allocates for `scratch` (a dict of `plgpu.SMEM` buffers and
    `plgpu.Barrier`s), as its launch check counts it: each buffer rounded up to 1 KiB, 8 bytes a
    barrier, and when the kernel `reduces` a register array along an axis, the scratch that
    reductions reserve (`plgpu.CompilerParams.reduction_scratch_bytes`)."""
    total = plgpu.CompilerParams().reduction_scratch_bytes if reduces else 0
    for x in scratch.values():
        if isinstance(x, plgpu.Barrier):
            total += math.prod(x.num_barriers) * BARRIER_BYTES
        else:
            total += -(-math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // SMEM_ALIGNMENT) * SMEM_ALIGNMENT
    return total


def fitting_scratch(make_scratch, *, pairs, reduces, kernel):
    """`(wgs, slots, scratch)` of the first layout whose scratch fits a CTA's shared memory, of: two
    consumer warpgroups (when the resident tiles pair up) and a double buffer of streamed tiles,
    one consumer and a double buffer, one consumer and a single buffer. `make_scratch(wgs, slots)`
    gives a layout's scratch; `reduces` as `smem_bytes`. ValueError naming `kernel` (the kernel
    and the shapes it was asked for) when none fits."""
    for wgs, slots in ((2, NUM_SLOTS), (1, NUM_SLOTS), (1, 1)):
        if wgs == 2 and not pairs:
            continue
        scratch = make_scratch(wgs, slots)
        need = smem_bytes(scratch, reduces=reduces)
        if need <= SMEM_PER_BLOCK:
            return wgs, slots, scratch
    raise ValueError(
        f"{kernel} needs {need} bytes of shared memory even with one consumer warpgroup and a single buffer, "
        f"more than the {SMEM_PER_BLOCK} of a Hopper CTA: use impl='pallas_triton'"
    )


def segment_table(q_ids, kv_ids, q_tiling, kv_tiling):
    """int32 [B, query tiles, key tiles]: 1 where the tiles' id ranges overlap (exact for the
    sorted ids that packing produces; padding repeats the edge id, so ranges are unchanged)."""
    B = q_ids.shape[0]
    q_t = q_ids.reshape(B, q_tiling.num_tiles, q_tiling.tile)
    kv_t = kv_ids.reshape(B, kv_tiling.num_tiles, kv_tiling.tile)
    q_min, q_max = q_t.min(-1)[:, :, None], q_t.max(-1)[:, :, None]
    kv_min, kv_max = kv_t.min(-1)[:, None, :], kv_t.max(-1)[:, None, :]
    return ((q_min <= kv_max) & (kv_min <= q_max)).astype(jnp.int32)


def tiles_seen(tiling, i, offset, other_tiling, other_offset, tile_range, *, causal, window):
    """For tile i of `tiling` (first position `offset`): the [lo, hi) tiles of `other_tiling`
    (first position `other_offset`) it may see, by `tile_range` (`gpu_tiling.kv_tile_range` for
    query tiles, `q_tile_range` for key tiles), then its first global position and real rows."""
    first, count = tiling.first_row(i)
    start = offset + first
    lo, hi = tile_range(start, start + count - 1, other_offset, other_tiling, causal=causal, window=window)
    return lo, hi, start, count


def streamed_tiles(seen, block, wgs):
    """(first tile, count) a CTA of `wgs` consumer tiles (block * wgs onwards) streams of the other
    axis: from its first tile's lower bound to its last one's upper bound (both grow with the
    position). `seen(i)` is `tiles_seen` bound to everything but the tile."""
    lo = seen(block * wgs)[0]
    hi = seen(block * wgs + wgs - 1)[1]
    return lo, jnp.maximum(hi - lo, 0)

