"""zigzag / unzigzag place chunk i and 2R-1-i on device i, and invert each other; so do their
shard_map forms from contiguous shards."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

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


@pytest.mark.parametrize("ring_size", [1, 2, 4, 8])
def test_zigzag_shard_moves_contiguous_shards_into_the_zigzag_layout_and_back(ring_size):
    """Inside shard_map, from contiguous shards: the same local shards as the global `zigzag`."""
    mesh = Mesh(np.array(jax.devices()[:ring_size]), ("sp",))
    x = np.random.default_rng(ring_size).standard_normal((2, 4 * 2 * ring_size, 3)).astype(np.float32)
    seq = P(None, "sp")
    to_zigzag = jax.shard_map(lambda s: ring_attn.zigzag_shard(s, "sp"), mesh=mesh, in_specs=seq, out_specs=seq)
    back = jax.shard_map(lambda s: ring_attn.unzigzag_shard(s, "sp"), mesh=mesh, in_specs=seq, out_specs=seq)
    z = to_zigzag(x)
    np.testing.assert_array_equal(z, ring_attn.zigzag(x, ring_size, axis=1))
    np.testing.assert_array_equal(back(z), x)


def test_zigzag_shard_needs_an_even_local_length():
    mesh = Mesh(np.array(jax.devices()[:2]), ("sp",))
    fn = jax.shard_map(
        lambda s: ring_attn.zigzag_shard(s, "sp"), mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp")
    )
    with pytest.raises(ValueError, match=r"local length along axis 1 must be even, got 3"):
        fn(np.arange(12.0).reshape(2, 6))
