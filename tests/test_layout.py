"""zigzag / unzigzag place chunk i and 2R-1-i on device i, and invert each other."""

import numpy as np
import pytest

import ring_attn


@pytest.mark.parametrize("ring_size", [1, 2, 4, 8])
def test_zigzag_places_chunks_and_inverts(ring_size):
    L = 6 * 2 * ring_size
    x = np.random.default_rng(ring_size).standard_normal((2, L, 3))
    z = ring_attn.zigzag(x, ring_size, axis=1)
    chunk = L // (2 * ring_size)
    shard = 2 * chunk
    for device in range(ring_size):
        local = z[:, device * shard:(device + 1) * shard]
        np.testing.assert_array_equal(local[:, :chunk], x[:, device * chunk:(device + 1) * chunk])
        mirror = 2 * ring_size - 1 - device
        np.testing.assert_array_equal(local[:, chunk:], x[:, mirror * chunk:(mirror + 1) * chunk])
    np.testing.assert_array_equal(ring_attn.unzigzag(z, ring_size, axis=1), x)
