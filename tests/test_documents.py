"""Packed documents end the ring early: on a causal contiguous ring with segment ids the ring runs
as many steps as the longest document reaches back, forward and backward, and stays exact."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, assert_matches_oracle, random_qkv, ring_mesh
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ring_attn
from ring_attn.ring import document_steps

R, T = 8, 16  # ring size, shard length
L = R * T


def packed_ids(lengths_per_row):
    """int32 [B, L]: consecutive documents of the given lengths (the last one cut at L)."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.repeat(np.arange(len(lengths)), lengths)[:L]
        rows.append(np.concatenate([ids, np.full(L - len(ids), len(lengths))]))
    return jnp.asarray(np.stack(rows), jnp.int32)


def brute_force_steps(ids):
    """1 + the farthest hop from a query's shard back to the shard of a key it sees (causal, same id)."""
    ids = np.asarray(ids)
    farthest = 0
    for row in ids:
        for i in range(L):
            first = np.flatnonzero(row[: i + 1] == row[i])[0]  # the earliest key the query sees
            farthest = max(farthest, i // T - first // T)
    return farthest + 1


def steps_on_the_ring(ids):
    fn = jax.shard_map(lambda ids: document_steps(ids, ids, "sp"), mesh=ring_mesh(R), in_specs=P(None, "sp"),
                       out_specs=P())
    return int(jax.jit(fn)(ids))


documents = st.lists(st.integers(1, L), min_size=1, max_size=12)


@given(st.lists(documents, min_size=1, max_size=2))
def test_steps_are_what_the_longest_document_reaches(lengths_per_row):
    ids = packed_ids(lengths_per_row)
    assert steps_on_the_ring(ids) == brute_force_steps(ids)


@pytest.mark.parametrize(
    "lengths,steps",
    [([T] * R, 1), ([L // 16] * 16, 1), ([T // 2] + [T] * (R - 1), 2), ([3 * T] * 3, 3), ([L], R)],
)
def test_steps_of_regular_packings(lengths, steps):
    assert steps_on_the_ring(packed_ids([lengths])) == steps


@pytest.mark.slow
@given(st.lists(documents, min_size=2, max_size=2), st.sampled_from([None, 5, 2 * T + 3]))
def test_packed_documents_match_oracle(lengths_per_row, window):
    # Forward and gradients, every step count from 1 to R (two rows packed differently).
    ids = packed_ids(lengths_per_row)
    q, k, v, d_out = random_qkv(len(lengths_per_row[0]), 2, L, 4, 2, 32)
    fn = functools.partial(ring_attn.ring_attention_global, mesh=ring_mesh(R), axis_name="sp", causal=True,
                           window=window, segment_ids=ids, block_sizes=ring_attn.BlockSizes(8, 8))
    assert_matches_oracle(fn, q, k, v, d_out, causal=True, window=window, q_segment_ids=ids, kv_segment_ids=ids)


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_packed_documents_on_the_pallas_kernels(impl):
    # Three steps of eight: the while loop and the power-of-two way home around interpreted kernels.
    ids = packed_ids([[3 * T - 5, 2 * T + 1, 2 * T, 3 * T + 4]])
    assert brute_force_steps(ids) == 3
    q, k, v, d_out = random_qkv(5, 1, L, 2, 1, 32)
    fn = functools.partial(ring_attn.ring_attention_global, mesh=ring_mesh(R), axis_name="sp", causal=True,
                           segment_ids=ids, impl=impl, check_vma=False)
    assert_matches_oracle(fn, q, k, v, d_out, compiler_options=FAST_COMPILE, causal=True, q_segment_ids=ids,
                          kv_segment_ids=ids)


def test_rings_of_other_batch_shards_agree_on_the_steps():
    # A 2 x 4 mesh, batch over "dp": one ring holds short documents (2 steps), the other one
    # document (4 steps). Both rings run 4 steps, so that their sends pair up.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
    n = 4 * T
    ids = jnp.asarray(np.stack([np.repeat(np.arange(4), T), np.zeros(n, int)]), jnp.int32)
    q, k, v, d_out = random_qkv(9, 2, n, 4, 2, 32)
    rows = P("dp", "sp")

    def local(q, k, v, ids):
        return ring_attn.ring_attention(q, k, v, axis_name="sp", causal=True, segment_ids=ids)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, rows), out_specs=rows)
    assert_matches_oracle(lambda q, k, v: fn(q, k, v, ids), q, k, v, d_out, causal=True, q_segment_ids=ids,
                          kv_segment_ids=ids)
