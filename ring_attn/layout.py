"""Sequence layouts over the ring.

"contiguous": device i holds the i-th of R equal shards. "zigzag": the sequence is cut into 2R
chunks and device i holds chunks i and 2R-1-i, so every device has the same causal work.

`zigzag` / `unzigzag` reorder a global array; `zigzag_shard` / `unzigzag_shard` do the same
inside `shard_map`, from and to contiguous shards, by moving half shards between devices (two
`ppermute`s) instead of a global gather.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

LAYOUTS = ("contiguous", "zigzag")


def _zigzag_order(ring_size):
    """Chunk order of the zigzag layout: [0, 2R-1, 1, 2R-2, ...]."""
    return np.array([c for i in range(ring_size) for c in (i, 2 * ring_size - 1 - i)])


def _check(x, ring_size, axis):
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1:
        raise ValueError(f"ring_size must be a positive int, got {ring_size!r}")
    length = x.shape[axis]
    if length % (2 * ring_size):
        raise ValueError(
            f"the zigzag layout cuts axis {axis} into 2 * {ring_size=} chunks: its length {length} "
            f"must be divisible by {2 * ring_size}"
        )


def _permute_chunks(x, order, axis):
    chunks = x.shape[axis] // len(order)
    shape = x.shape[:axis] + (len(order), chunks) + x.shape[axis + 1:]
    return x.reshape(shape).take(order, axis=axis).reshape(x.shape)


def zigzag(x, ring_size, axis=1):
    """Reorder a global array from natural order into the zigzag layout along `axis`."""
    _check(x, ring_size, axis)
    return _permute_chunks(x, _zigzag_order(ring_size), axis)


def unzigzag(x, ring_size, axis=1):
    """Inverse of `zigzag`: back to natural order."""
    _check(x, ring_size, axis)
    return _permute_chunks(x, np.argsort(_zigzag_order(ring_size)), axis)


def _zigzag_device(chunk, ring_size):
    """The device that holds chunk `chunk` in the zigzag layout."""
    return chunk if chunk < ring_size else 2 * ring_size - 1 - chunk


def _shard_moves(x, axis_name, axis):
    """The ring size, the two moves of half shards, and whether this device keeps the chunk that
    came from an even (first) half in its first slot. Contiguous device i holds chunks 2i and
    2i+1; each parity is a permutation of the devices, and device d receives its even chunk into
    its first slot exactly when d is even."""
    if x.shape[axis] % 2:
        raise ValueError(
            f"the zigzag layout splits each local shard in two halves: the local length along axis {axis} "
            f"must be even, got {x.shape[axis]}"
        )
    ring_size = lax.axis_size(axis_name)
    moves = [[(i, _zigzag_device(2 * i + half, ring_size)) for i in range(ring_size)] for half in (0, 1)]
    return moves, lax.axis_index(axis_name) % 2 == 0


def halves(x, axis):
    """The first and second halves of `x` along `axis`."""
    c = x.shape[axis] // 2
    return lax.slice_in_dim(x, 0, c, axis=axis), lax.slice_in_dim(x, c, None, axis=axis)


def zigzag_shard(x, axis_name, axis=1):
    """Inside `shard_map`: this device's contiguous shard of a sequence -> its zigzag shard."""
    moves, even_first = _shard_moves(x, axis_name, axis)
    even, odd = (lax.ppermute(half, axis_name, move) for half, move in zip(halves(x, axis), moves))
    first, second = jnp.where(even_first, even, odd), jnp.where(even_first, odd, even)
    return jnp.concatenate([first, second], axis)


def unzigzag_shard(x, axis_name, axis=1):
    """Inside `shard_map`: inverse of `zigzag_shard`, a zigzag shard -> the contiguous shard."""
    moves, even_first = _shard_moves(x, axis_name, axis)
    first, second = halves(x, axis)
    even, odd = jnp.where(even_first, first, second), jnp.where(even_first, second, first)
    back = [[(dst, src) for src, dst in move] for move in moves]
    return jnp.concatenate([lax.ppermute(even, axis_name, back[0]), lax.ppermute(odd, axis_name, back[1])], axis)
