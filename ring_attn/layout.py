"""Sequence layouts over the ring.

"contiguous": device i holds the i-th of R equal shards. "zigzag": the sequence is cut into 2R
chunks and device i holds chunks i and 2R-1-i, so every device has the same causal work.
"""

import numpy as np

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
