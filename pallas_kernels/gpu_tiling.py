"""How the GPU kernel families (Triton, Mosaic GPU) tile a sequence axis: padding of blocks to
the tile shapes the hardware needs, the tiles a query or key range may see, and head-dim padding."""

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How one sequence axis of `length` rows reaches a kernel.

    Each caller block of `block` rows becomes `padded` rows (the block itself, or rounded up to a
    multiple of the kernel's smallest tile when its largest power-of-two divisor is smaller), cut into tiles of
    `tile` rows. Padding rows sit at the end of each block, so the real rows of a tile are a
    prefix of it and positions stay monotonic across tiles. Padding is under that smallest tile <= tile
    rows, so every tile holds at least one real row.
    """

    length: int
    block: int
    padded: int
    tile: int

    @classmethod
    def make(cls, length, block, cap, min_tile):
        """`min_tile`: a power of two <= cap, the smallest tile the kernel family accepts."""
        padded = block if block & -block >= min_tile else -(-block // min_tile) * min_tile
        return cls(length, block, padded, min(cap, padded & -padded))

    @property
    def is_padded(self):
        return self.padded != self.block

    @property
    def padded_length(self):
        return self.length // self.block * self.padded

    @property
    def num_tiles(self):
        return self.padded_length // self.tile

    def pad(self, x, axis=1, mode="constant"):
        if not self.is_padded:
            return x
        shape = x.shape
        x = x.reshape(*shape[:axis], self.length // self.block, self.block, *shape[axis + 1 :])
        widths = [(0, 0)] * x.ndim
        widths[axis + 1] = (0, self.padded - self.block)
        x = jnp.pad(x, widths, mode=mode)
        return x.reshape(*shape[:axis], self.padded_length, *shape[axis + 1 :])

    def unpad(self, x, axis):
        if not self.is_padded:
            return x
        shape = x.shape
        x = x.reshape(*shape[:axis], self.length // self.block, self.padded, *shape[axis + 1 :])
        x = lax.slice_in_dim(x, 0, self.block, axis=axis + 1)
        return x.reshape(*shape[:axis], self.length, *shape[axis + 1 :])

    # In-kernel helpers: `i` is a traced tile index, positions are local (add the offset).

    def first_row(self, i):
        """(local position of tile i's first row, number of real rows in it)."""
        if not self.is_padded:
            return i * self.tile, self.tile
        within = lax.rem(i * self.tile, self.padded)
        return lax.div(i * self.tile, self.padded) * self.block + within, jnp.minimum(self.tile, self.block - within)

    def rows(self, i):
        """`first_row(i)` and a [tile] bool of its real rows (None when nothing is padded)."""
        first, count = self.first_row(i)
        real = None if not self.is_padded else jnp.arange(self.tile, dtype=jnp.int32) < count
        return first, count, real

    def _padded_index(self, x):
        if not self.is_padded:
            return x
        return lax.div(x, self.block) * self.padded + lax.rem(x, self.block)

    def first_tile(self, start):
        """The first tile holding a real row at local position >= `start` (num_tiles if none)."""
        start = jnp.clip(start, 0, self.length)
        return lax.div(self._padded_index(start), self.tile)

    def end_tile(self, stop):
        """One past the last tile holding a real row at local position < `stop`."""
        stop = jnp.clip(stop, 0, self.length)
        if not self.is_padded:
            return lax.div(stop + (self.tile - 1), self.tile)
        last = self._padded_index(jnp.maximum(stop, 1) - 1)
        return jnp.where(stop > 0, lax.div(last, self.tile) + 1, 0)


def pad_head(x, head_dim):
    """x zero-padded on its last axis to `head_dim` (q and k to theirs, v and d_out to theirs)."""
    if x.shape[-1] == head_dim:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, head_dim - x.shape[-1])])


def pad_segment_ids(q_segment_ids, kv_segment_ids, q_tiling, kv_tiling):
    if q_segment_ids is None:
        return None, None
    # Edge padding keeps each tile's id range, which the segment skip compares.
    return (
        q_tiling.pad(q_segment_ids.astype(jnp.int32), mode="edge"),
        kv_tiling.pad(kv_segment_ids.astype(jnp.int32), mode="edge"),
    )


def kv_tile_range(q_first, q_last, kv_offset, kv_tiling, *, causal, window):
    """[lo, hi) key tiles that some query at global positions q_first..q_last may see."""
    lo, hi = 0, kv_tiling.num_tiles
    if window is not None:
        lo = kv_tiling.first_tile(q_first - kv_offset - window + 1)
    if causal:
        hi = kv_tiling.end_tile(q_last - kv_offset + 1)
    elif window is not None:
        hi = kv_tiling.end_tile(q_last - kv_offset + window)
    return lo, hi


def q_tile_range(kv_first, kv_last, q_offset, q_tiling, *, causal, window):
    """[lo, hi) query tiles that may see some key at global positions kv_first..kv_last."""
    lo, hi = 0, q_tiling.num_tiles
    if causal:
        lo = q_tiling.first_tile(kv_first - q_offset)
    elif window is not None:
        lo = q_tiling.first_tile(kv_first - q_offset - window + 1)
    if window is not None:
        hi = q_tiling.end_tile(kv_last - q_offset + window)
    return lo, hi
