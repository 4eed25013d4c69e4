"""ring_attention against the float64 oracle: forward and gradients, over rings of 1 to 8 devices."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FULL,
    assert_close,
    assert_matches_oracle,
    oracle,
    output_and_grads,
    random_qkv,
    random_segments,
    ring_mesh,
)
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ring_attn

RINGS = (2, 4, 8)
GQA = ((4, 4), (4, 1), (8, 2))  # (N, K)
HEAD_DIMS = (32, 64, 80, 128)
MLA_HEAD_DIMS = ((192, 128), (96, 64), (64, 32), (32, 64))  # (q/k, v): values of their own width


def ring_fn(ring_size, **kwargs):
    mesh = ring_mesh(ring_size)
    return functools.partial(ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", **kwargs)


def check_against_oracle(ring_size, *, causal, layout, segments, N, K, H, B=2, T=16, block_sizes=None, seed=0):
    """`H` is one head dim, or a pair (q/k, v)."""
    L = T * ring_size
    H, Hv = H if isinstance(H, tuple) else (H, H)
    q, k, v, d_out = random_qkv(seed, B, L, N, K, H, Hv=Hv)
    ids = random_segments(seed + 1, B, L) if segments else None
    fn = ring_fn(ring_size, causal=causal, layout=layout, segment_ids=ids, block_sizes=block_sizes)
    assert_matches_oracle(fn, q, k, v, d_out, causal=causal, q_segment_ids=ids, kv_segment_ids=ids)


def grid():
    """Every ring x causal x layout x segments; GQA ratio and head dim cycle through their values
    (the full profile takes the whole product with them)."""
    if FULL:
        return list(itertools.product(RINGS, (False, True), ("contiguous", "zigzag"), (False, True), GQA, HEAD_DIMS))
    cases = itertools.product(RINGS, (False, True), ("contiguous", "zigzag"), (False, True))
    return [(*case, GQA[i % 3], HEAD_DIMS[i % 4]) for i, case in enumerate(cases)]


@pytest.mark.parametrize("ring_size,causal,layout,segments,gqa,H", grid())
def test_grid_matches_oracle(ring_size, causal, layout, segments, gqa, H):
    N, K = gqa
    check_against_oracle(ring_size, causal=causal, layout=layout, segments=segments, N=N, K=K, H=H)


@st.composite
def ring_configs(draw):
    ring_size = draw(st.sampled_from((1, 2, 4, 8)))
    layout = draw(st.sampled_from(("contiguous", "zigzag")))
    T = draw(st.sampled_from((8, 16, 24, 32)))
    tiled = T // 2 if layout == "zigzag" else T
    divisors = [d for d in range(4, tiled + 1) if tiled % d == 0] or [tiled]
    block_sizes = draw(
        st.one_of(
            st.none(),
            st.builds(
                ring_attn.BlockSizes,
                block_q=st.sampled_from(divisors),
                block_kv=st.sampled_from(divisors),
                block_q_dkv=st.sampled_from(divisors),
                block_kv_dkv=st.sampled_from(divisors),
            ),
        )
    )
    N, K = draw(st.sampled_from(GQA))
    return dict(
        ring_size=ring_size, layout=layout, T=T, block_sizes=block_sizes, N=N, K=K,
        causal=draw(st.booleans()), segments=draw(st.booleans()),
        H=draw(st.sampled_from(HEAD_DIMS + MLA_HEAD_DIMS)), B=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.slow
@given(ring_configs())
def test_property_matches_oracle(config):
    check_against_oracle(**config)


@pytest.mark.parametrize(
    "ring_size,layout,heads,options",
    [
        (4, "zigzag", (192, 128), dict(causal=True, segments=True, logit_soft_cap=3.0, sinks=True)),
        (8, "contiguous", (96, 64), dict(causal=True, window=24, segments=True)),
        (8, "contiguous", (64, 32), dict(causal=True, documents=True)),
        (4, "contiguous", (32, 64), dict(causal=False, segments=True, logit_soft_cap=2.0, sinks=True)),
        (8, "zigzag", (64, 32), dict(causal=False)),
    ],
)
def test_mla_head_dims_with_every_option_match_oracle(ring_size, layout, heads, options):
    # Values of their own width (MLA) through the ring's options: GQA 4:2, segments, a window,
    # soft-cap, sinks, and packed documents that end the ring early.
    options = dict(options)
    causal, window, cap = options.pop("causal"), options.pop("window", None), options.pop("logit_soft_cap", None)
    B, L, (H, Hv) = 2, 16 * ring_size, heads
    q, k, v, d_out = random_qkv(ring_size + H + Hv, B, L, 4, 2, H, Hv=Hv)
    if options.pop("documents", False):  # documents of 12 tokens: the ring stops after two hops
        ids = jnp.asarray(np.broadcast_to(np.arange(L) // 12, (B, L)), jnp.int32)
    else:
        ids = random_segments(H, B, L) if options.pop("segments", False) else None
    sinks = options.pop("sinks", False) and jnp.asarray(np.random.default_rng(Hv).normal(0.5, 1.0, 4), jnp.float32)
    fn = ring_fn(ring_size, causal=causal, layout=layout, window=window, logit_soft_cap=cap, segment_ids=ids)
    masking = dict(q_segment_ids=ids, kv_segment_ids=ids) if ids is not None else {}
    if sinks is False:
        assert_matches_oracle(fn, q, k, v, d_out, causal=causal, window=window, logit_soft_cap=cap, **masking)
    else:
        assert_matches_oracle(lambda q, k, v, s: fn(q, k, v, sinks=s), q, k, v, d_out, sinks=sinks, causal=causal,
                              window=window, logit_soft_cap=cap, **masking)


@pytest.mark.parametrize("causal", [False, True])
def test_single_device_query_and_key_lengths_differ(causal):
    q, k, v, d_out = random_qkv(3, 2, 24, 8, 2, 64, S=40)
    q_ids = random_segments(4, 2, 24, max_segments=2)
    kv_ids = random_segments(5, 2, 40, max_segments=2)
    fn = functools.partial(
        ring_attn.ring_attention, causal=causal, segment_ids=(q_ids, kv_ids), block_sizes=ring_attn.BlockSizes(8, 8)
    )
    assert_matches_oracle(fn, q, k, v, d_out, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids)


@pytest.mark.slow
def test_result_does_not_depend_on_ring_size():
    q, k, v, d_out = random_qkv(6, 2, 64, 4, 2, 64)
    ids = random_segments(7, 2, 64)
    results = [
        output_and_grads(ring_fn(r, causal=True, layout="zigzag", segment_ids=ids), q, k, v, d_out)
        for r in (1, 2, 4, 8)
    ]
    (out1, grads1) = results[0]
    for ring_size, (out, grads) in zip((2, 4, 8), results[1:]):
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (out1, *grads1)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            err = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert err < 2e-6, (
                f"ring of {ring_size} vs 1: {name} differs by {err:.2e} (relative), beyond float32 rounding"
            )


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_rows_with_no_visible_key_are_zero_with_zero_gradient(layout):
    B, L, R = 2, 64, 4
    q, k, v, d_out = random_qkv(8, B, L, 4, 2, 32)
    rng = np.random.default_rng(9)
    kv_ids = jnp.asarray(rng.integers(0, 3, (B, L)), jnp.int32)
    q_ids = jnp.asarray(rng.integers(0, 4, (B, L)), jnp.int32)  # id 3 has no key anywhere
    fn = ring_fn(R, causal=True, layout=layout, segment_ids=(q_ids, kv_ids))
    out, (dq, dk, dv) = output_and_grads(fn, q, k, v, d_out)
    chex.assert_tree_all_finite(dict(out=out, dq=dq, dk=dk, dv=dv))
    blind = np.asarray(q_ids == 3)
    assert blind.any()
    np.testing.assert_array_equal(np.asarray(out)[blind], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[blind], 0.0)
    expected, expected_grads = oracle(q, k, v, d_out, causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), (dq, dk, dv), expected_grads):
        assert_close(g, e, kind="gradient", name=name)


def test_logits_scaled_by_100_stay_finite_and_exact():
    q, k, v, d_out = random_qkv(10, 1, 64, 4, 4, 32)
    q = q * 100.0
    fn = ring_fn(8, causal=True, layout="zigzag")
    assert_matches_oracle(fn, q, k, v, d_out, causal=True)


@pytest.mark.slow
def test_bfloat16_ring_of_8_is_close_to_float32():
    q, k, v, d_out = random_qkv(11, 2, 128, 8, 2, 64)
    fn = ring_fn(8, causal=True, layout="zigzag")
    out32, grads32 = output_and_grads(fn, q, k, v, d_out)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, d_out)]
    out16, grads16 = output_and_grads(fn, *bf16)
    assert out16.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads16)
    assert_close(out16, out32, dtype=jnp.bfloat16, name="out")
    for name, g16, g32 in zip(("dq", "dk", "dv"), grads16, grads32):
        assert_close(g16, g32, dtype=jnp.bfloat16, kind="gradient", name=name)


@pytest.mark.parametrize("transform", ["check_vma_false", "vmap_over_batch", "checkpoint"])
def test_under_transforms(transform):
    R, B, L = 4, 2, 64
    q, k, v, d_out = random_qkv(12, B, L, 4, 2, 32)
    ids = random_segments(13, B, L)

    def attend(q, k, v, ids):
        return ring_attn.ring_attention(q, k, v, axis_name="sp", causal=True, layout="zigzag", segment_ids=ids)

    check_vma = True
    match transform:
        case "check_vma_false":
            check_vma = False
        case "vmap_over_batch":
            # vmap maps the batch axis away: each call sees one [1, T, N, H] example.
            attend = jax.vmap(lambda q, k, v, ids, f=attend: f(q[None], k[None], v[None], ids[None])[0])
        case "checkpoint":
            attend = jax.checkpoint(attend)
    seq = P(None, "sp")
    sharded = jax.shard_map(attend, mesh=ring_mesh(R), in_specs=(seq,) * 4, out_specs=seq, check_vma=check_vma)
    zz = functools.partial(ring_attn.zigzag, ring_size=R)
    fn = lambda q, k, v: ring_attn.unzigzag(sharded(zz(q), zz(k), zz(v), zz(ids)), R)  # noqa: E731
    assert_matches_oracle(fn, q, k, v, d_out, causal=True, q_segment_ids=ids, kv_segment_ids=ids)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal,segments", [(True, False), (False, False), (True, True), (False, True)])
def test_any_global_length_matches_oracle(layout, causal, segments):
    # 100 tokens on a ring of 8: padded inside to 104 (contiguous) or 112 (zigzag, 2R chunks),
    # the padding masked and sliced off; forward and gradients as dense attention on the 100.
    L = 100
    q, k, v, d_out = random_qkv(31, 1, L, 4, 2, 32)
    ids = random_segments(32, 1, L, 3) if segments else None
    fn = functools.partial(ring_attn.ring_attention_global, mesh=ring_mesh(8), axis_name="sp", causal=causal,
                           layout=layout, segment_ids=ids)
    masking = dict(q_segment_ids=ids, kv_segment_ids=ids) if segments else {}
    assert_matches_oracle(fn, q, k, v, d_out, causal=causal, **masking)


@pytest.mark.parametrize(
    "ring_size,layout,causal,segments,check_vma",
    [
        (8, "zigzag", True, True, True),
        (4, "contiguous", True, False, False),
        (2, "contiguous", False, True, True),
        (1, "zigzag", False, False, True),
    ],
)
def test_soft_cap_and_sinks_match_oracle(ring_size, layout, causal, segments, check_vma):
    # The sinks are replicated: each device's rows give a share of their gradient, summed over the
    # ring (by the vma transpose with check_vma, by shard_map's own psum without).
    L, N, K = 16 * ring_size, 4, 2
    q, k, v, d_out = random_qkv(41 + ring_size, 2, L, N, K, 32)
    q, k = 2.0 * q, 2.0 * k  # scores well past the cap
    sinks = jnp.asarray(np.random.default_rng(ring_size).normal(0.5, 1.0, N), jnp.float32)
    ids = random_segments(42, 2, L) if segments else None
    fn = functools.partial(
        ring_attn.ring_attention_global, mesh=ring_mesh(ring_size), axis_name="sp", causal=causal, layout=layout,
        segment_ids=ids, logit_soft_cap=3.0, check_vma=check_vma,
    )
    masking = dict(q_segment_ids=ids, kv_segment_ids=ids) if segments else {}
    assert_matches_oracle(
        lambda q, k, v, sinks: fn(q, k, v, sinks=sinks), q, k, v, d_out, sinks=sinks, causal=causal,
        logit_soft_cap=3.0, **masking,
    )
