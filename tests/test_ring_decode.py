"""ring_decode and ring_cache_update against dense attention and dense cache writes."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, random_qkv, ring_mesh
from jax.sharding import PartitionSpec as P

import reference
import ring_attn

SEQ = P(None, "sp")
LAYOUTS = ("contiguous", "zigzag")


def to_layout(x, ring_size, layout):
    return ring_attn.zigzag(x, ring_size) if layout == "zigzag" else x


def from_layout(x, ring_size, layout):
    return ring_attn.unzigzag(x, ring_size) if layout == "zigzag" else x


def sharded_decode(ring_size, layout, **options):
    """ring_decode on global caches (in the layout's order) over a ring of `ring_size` devices."""
    fn = functools.partial(ring_attn.ring_decode, axis_name="sp", layout=layout, **options)
    return jax.jit(jax.shard_map(
        lambda q, k, v, length, sinks: fn(q, k, v, kv_length=length, sinks=sinks),
        mesh=ring_mesh(ring_size), in_specs=(P(), SEQ, SEQ, P(), P()), out_specs=P(),
    ))


def sharded_update(ring_size, layout):
    fn = functools.partial(ring_attn.ring_cache_update, axis_name="sp", layout=layout)
    return jax.jit(jax.shard_map(
        lambda k, v, k_new, v_new, position: fn(k, v, k_new, v_new, position=position),
        mesh=ring_mesh(ring_size), in_specs=(SEQ, SEQ, P(), P(), P()), out_specs=(SEQ, SEQ),
    ))


def dense_decode(q, k, v, kv_length, logit_soft_cap=None, sinks=None):
    """float64 oracle: row b's n queries at kv_length[b] - n + j, causal over the whole cache, which
    is attention over the valid prefix 0 .. kv_length[b] - 1 (later keys are in the queries' future)."""
    n = q.shape[1]
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        sinks = None if sinks is None else jnp.asarray(np.asarray(sinks, np.float64))
        rows = _dense_rows(logit_soft_cap)
        return np.asarray(rows(*args, jnp.asarray(kv_length, jnp.int64) - n, sinks))


@functools.cache
def _dense_rows(logit_soft_cap):
    def row(q, k, v, q_offset, sinks):
        return reference.attention(q[None], k[None], v[None], causal=True, q_offset=q_offset,
                                   logit_soft_cap=logit_soft_cap, sinks=sinks, dtype=jnp.float64)[0]

    return jax.jit(jax.vmap(row, in_axes=(0, 0, 0, 0, None)))


# Rings of 1, 4, 8 x both layouts x n in (1, 3); GQA (N=4, K=2) and MHA alternate.
CASES = [(*case, (4, 2) if i % 2 else (2, 2)) for i, case in enumerate(itertools.product((1, 4, 8), LAYOUTS, (1, 3)))]


@pytest.mark.parametrize("ring_size,layout,n,heads", CASES)
def test_decode_matches_dense(ring_size, layout, n, heads):
    (N, K), B, L, H = heads, 2, 64, 16
    q, k, v, _ = random_qkv(ring_size * 10 + n, B, n, N, K, H, S=L)  # whole cache random, stale slots too
    kv_length = jnp.array([37, 64], jnp.int32)
    k_cache, v_cache = to_layout(k, ring_size, layout), to_layout(v, ring_size, layout)
    out = sharded_decode(ring_size, layout)(q, k_cache, v_cache, kv_length, None)
    assert out.dtype == q.dtype
    assert_close(out, dense_decode(q, k, v, kv_length))


@pytest.mark.parametrize("ring_size,layout", [(4, "zigzag"), (8, "contiguous")])
def test_decode_soft_cap_and_sinks_match_dense(ring_size, layout):
    # Row 0 decodes at position 0 of 3: the first query sees one key, so the sink's share is large.
    B, L, N, K, H, n = 2, 64, 4, 2, 16, 3
    q, k, v, _ = random_qkv(77, B, n, N, K, H, S=L)
    q, k = 2.0 * q, 2.0 * k  # scores well past the cap
    sinks = jnp.asarray(np.random.default_rng(78).normal(0.5, 1.0, N), jnp.float32)
    kv_length = jnp.array([n, 50], jnp.int32)
    k_cache, v_cache = to_layout(k, ring_size, layout), to_layout(v, ring_size, layout)
    out = sharded_decode(ring_size, layout, logit_soft_cap=2.5)(q, k_cache, v_cache, kv_length, sinks)
    assert_close(out, dense_decode(q, k, v, kv_length, logit_soft_cap=2.5, sinks=sinks))


@pytest.mark.parametrize("H,Hv,layout,sinks_and_cap", [
    (64, 32, "contiguous", False), (64, 32, "zigzag", True), (32, 64, "contiguous", True), (32, 64, "zigzag", False),
])
def test_decode_mla_head_dims_match_dense(H, Hv, layout, sinks_and_cap):
    # Multi-head latent attention: values narrower or wider than q and k. The output takes v's
    # width; the default scale stays 1 / sqrt(H), as in the oracle.
    R, B, L, N, K, n = 4, 2, 64, 4, 2, 3
    q, k, v, _ = random_qkv(H + 2 * Hv, B, n, N, K, H, S=L, Hv=Hv)
    options, sinks = {}, None
    if sinks_and_cap:
        q, k = 2.0 * q, 2.0 * k  # scores well past the cap
        options = dict(logit_soft_cap=2.5)
        sinks = jnp.asarray(np.random.default_rng(H).normal(0.5, 1.0, N), jnp.float32)
    kv_length = jnp.array([n, 50], jnp.int32)  # row 0: the first query sees one key
    k_cache, v_cache = to_layout(k, R, layout), to_layout(v, R, layout)
    out = sharded_decode(R, layout, **options)(q, k_cache, v_cache, kv_length, sinks)
    assert out.shape == (B, n, N, Hv)
    assert_close(out, dense_decode(q, k, v, kv_length, sinks=sinks, **options))


def test_decode_bfloat16_and_scale():
    q, k, v, _ = random_qkv(5, 2, 2, 4, 1, 16, S=32, dtype=jnp.bfloat16)
    fn = jax.jit(jax.shard_map(
        lambda q, k, v: ring_attn.ring_decode(q, k, v, axis_name="sp", kv_length=20, layout="zigzag", scale=0.3),
        mesh=ring_mesh(4), in_specs=(P(), SEQ, SEQ), out_specs=P(),
    ))
    out = fn(q, ring_attn.zigzag(k, 4), ring_attn.zigzag(v, 4))
    assert out.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        args = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        expected = jax.jit(functools.partial(
            reference.attention, causal=True, q_offset=18, scale=0.3, dtype=jnp.float64))(*args)
    assert_close(out, np.asarray(expected))


def test_row_that_sees_nothing_is_zero():
    q, k, v, _ = random_qkv(3, 2, 2, 4, 2, 8, S=16)
    kv_length = jnp.array([0, 1], jnp.int32)  # row 0: nothing; row 1: query 0 at -1 sees nothing
    for out in (
        sharded_decode(4, "zigzag")(q, ring_attn.zigzag(k, 4), ring_attn.zigzag(v, 4), kv_length, None),
        jax.jit(functools.partial(ring_attn.ring_decode, axis_name=None))(q, k, v, kv_length=kv_length),
    ):
        out = np.asarray(out)
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[0], 0.0)
        np.testing.assert_array_equal(out[1, 0], 0.0)
        assert_close(out[1, 1:], dense_decode(q[1:, 1:], k[1:], v[1:], [1])[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_positions(layout):
    fn = jax.shard_map(lambda: ring_attn.cache_positions(8, "sp", layout)[None],
                       mesh=ring_mesh(4), in_specs=(), out_specs=P("sp"))
    positions = np.asarray(fn()).reshape(1, 32)
    np.testing.assert_array_equal(from_layout(positions, 4, layout)[0], np.arange(32))


# Hv: v's head dim, equal to H = 8, narrower or wider (MLA).
@pytest.mark.parametrize("ring_size,layout,Hv", [(4, "contiguous", 8), (4, "zigzag", 8), (8, "zigzag", 8),
                                                 (4, "contiguous", 4), (4, "zigzag", 16)])
def test_cache_update_matches_dense(ring_size, layout, Hv):
    B, L, n, K, H = 3, 64, 4, 2, 8
    _, k, v, _ = random_qkv(ring_size, B, 1, 2, K, H, S=L, Hv=Hv)
    _, k_new, v_new, _ = random_qkv(ring_size + 1, B, 1, 2, K, H, S=n, Hv=Hv)
    # A shard (and zigzag chunk) boundary is crossed in every layout; the last row runs off the end.
    position = np.array([5, 29, L - 2])
    k_out, v_out = sharded_update(ring_size, layout)(
        to_layout(k, ring_size, layout), to_layout(v, ring_size, layout), k_new, v_new, jnp.asarray(position)
    )
    for cache, new, got in ((k, k_new, k_out), (v, v_new, v_out)):
        expected = np.array(cache)
        for b, start in enumerate(position):
            stop = min(start + n, L)
            expected[b, start:stop] = new[b, :stop - start]
        np.testing.assert_array_equal(from_layout(np.asarray(got), ring_size, layout), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_then_decode_end_to_end(layout):
    """Cache prefilled for per-row prompt lengths, then steps of 3, 1, 1 new tokens, each written
    with ring_cache_update and attended with ring_decode, equal dense causal attention row by row."""
    R, B, L, N, K, H = 4, 2, 32, 4, 2, 16
    q, k, v, _ = random_qkv(7, B, L, N, K, H)  # the whole sequence's true q, k, v
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        dense = jax.jit(functools.partial(reference.attention, causal=True, dtype=jnp.float64))
        expected = np.asarray(dense(q64, k64, v64))
    prompt = np.array([9, 14])
    _, k_cache, v_cache, _ = random_qkv(8, B, 1, N, K, H, S=L)  # garbage where nothing is written yet
    for b, p in enumerate(prompt):
        k_cache, v_cache = k_cache.at[b, :p].set(k[b, :p]), v_cache.at[b, :p].set(v[b, :p])
    k_cache, v_cache = to_layout(k_cache, R, layout), to_layout(v_cache, R, layout)

    def step(k_cache, v_cache, q_new, k_new, v_new, position):
        k_cache, v_cache = ring_attn.ring_cache_update(
            k_cache, v_cache, k_new, v_new, axis_name="sp", position=position, layout=layout
        )
        n = q_new.shape[1]
        out = ring_attn.ring_decode(q_new, k_cache, v_cache, axis_name="sp", kv_length=position + n, layout=layout)
        return k_cache, v_cache, out

    step = jax.jit(jax.shard_map(step, mesh=ring_mesh(R), in_specs=(SEQ, SEQ, P(), P(), P(), P()),
                                 out_specs=(SEQ, SEQ, P())))
    position = prompt.copy()
    for n in (3, 1, 1):
        take = position[:, None] + np.arange(n)  # [B, n] global positions of the new tokens
        new = [np.take_along_axis(np.asarray(x), take[:, :, None, None], axis=1) for x in (q, k, v)]
        k_cache, v_cache, out = step(k_cache, v_cache, *new, jnp.asarray(position, jnp.int32))
        assert_close(out, np.take_along_axis(expected, take[:, :, None, None], axis=1), name=f"step n={n}")
        position += n


def _decode(q_shape=(2, 1, 4, 8), k_shape=(2, 16, 2, 8), **kwargs):
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (q_shape, k_shape))
    kwargs = {"axis_name": None, "kv_length": 5, **kwargs}
    return ring_attn.ring_decode(q, k, kwargs.pop("v", k), **kwargs)


@pytest.mark.parametrize("call,match", [
    (lambda: _decode(q_shape=(2, 4, 8)), "q must have rank 4"),
    (lambda: _decode(k_shape=(2, 16, 3, 8)), "k_cache has K=3 heads"),
    (lambda: _decode(k_shape=(3, 16, 2, 8)), "must agree on B and H"),
    (lambda: _decode(v=jnp.ones((2, 16, 1, 4))),
     r"k_cache \[B, C, K, H\] and v_cache \[B, C, K, Hv\] must agree on B, C and K, "
     r"got k_cache \(2, 16, 2, 8\) and v_cache \(2, 16, 1, 4\)"),
    (lambda: _decode(v=jnp.ones((2, 8, 2, 8))), r"got k_cache \(2, 16, 2, 8\) and v_cache \(2, 8, 2, 8\)"),
    (lambda: _decode(layout="striped"), "unknown layout='striped'"),
    (lambda: _decode(k_shape=(2, 15, 2, 8), layout="zigzag"), "local cache length must be even, got 15"),
    (lambda: _decode(kv_length=jnp.array([3, 4, 5])), r"kv_length must have shape \[\] or \[B\] = \(2,\), got \(3,\)"),
    (lambda: _decode(kv_length=17), r"kv_length must be in \[0, 16\], got 17"),
    (lambda: _decode(kv_length=2.5), "kv_length must be an int"),
    (lambda: _decode(scale="big"), "scale must be a finite"),
    (lambda: _decode(axis_name="sp"), "axis_name='sp' is not bound"),
    (lambda: ring_attn.ring_cache_update(*[jnp.ones((2, 8, 2, 4))] * 2, *[jnp.ones((2, 1, 3, 4))] * 2,
                                         axis_name=None, position=0), r"k_new \[B, n, K, H\]"),
    (lambda: ring_attn.ring_cache_update(jnp.ones((2, 8, 2, 4)), jnp.ones((2, 8, 2, 6)), *[jnp.ones((2, 1, 2, 4))] * 2,
                                         axis_name=None, position=0),
     r"v_new \[B, n, K, Hv\] = \(2, 1, 2, 4\) must match v_cache \[B, C, K, Hv\] = \(2, 8, 2, 6\)"),
    (lambda: ring_attn.ring_cache_update(*[jnp.ones((2, 8, 2, 4))] * 2, *[jnp.ones((2, 1, 2, 4))] * 2,
                                         axis_name=None, position=jnp.zeros((2, 1), jnp.int32)),
     "position must have shape"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
