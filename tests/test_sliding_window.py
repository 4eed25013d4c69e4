"""Sliding-window ring attention against the float64 oracle given the same window."""

import functools

import jax
import numpy as np
import pytest
from conftest import assert_close, oracle, output_and_grads, random_qkv, random_segments, ring_mesh

import ring_attn
from ring_attn.ring import steps_needed

T = 16  # local shard length


@pytest.mark.parametrize(
    "ring_size,causal,window,segments,gqa",
    [
        (1, True, 5, True, (4, 1)),
        (2, True, T, False, (4, 4)),
        (4, True, T + 3, True, (8, 2)),
        (8, True, 1, False, (4, 1)),
        (8, True, 2 * T + 1, True, (4, 4)),
        (8, True, 8 * T, False, (8, 2)),
        (2, False, 7, True, (4, 1)),
        (4, False, T, False, (8, 2)),
        (8, False, 2 * T + 5, True, (4, 4)),
    ],
)
def test_window_matches_oracle(ring_size, causal, window, segments, gqa):
    N, K = gqa
    B, L = 2, T * ring_size
    q, k, v, d_out = random_qkv(window + ring_size, B, L, N, K, 32)
    ids = random_segments(window, B, L, 3) if segments else None
    fn = functools.partial(
        ring_attn.ring_attention_global, mesh=ring_mesh(ring_size), axis_name="sp",
        causal=causal, window=window, segment_ids=ids, block_sizes=ring_attn.BlockSizes(8, 8),
    )
    out, grads = output_and_grads(fn, q, k, v, d_out)
    expected, expected_grads = oracle(
        q, k, v, d_out, causal=causal, window=window, q_segment_ids=ids, kv_segment_ids=ids
    )
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        if name in ("dq", "dk") and window == 1:
            # Each query sees only itself: the softmax is constant, so dq and dk are 0 up to rounding.
            assert np.abs(np.asarray(g)).max() < 1e-5
            continue
        assert_close(g, e, kind="gradient", name=name)


@pytest.mark.parametrize("window,steps", [(1, 1), (T, 2), (T + 1, 2), (T + 2, 3), (3 * T, 4), (100 * T, 8)])
def test_causal_window_stops_the_ring_after_the_hops_it_reaches(window, steps):
    assert steps_needed(8, T, causal=True, window=window) == steps
    # With at most 2 steps there is no step loop at all: the program has fewer sends than a full ring.
    q, k, v, _ = random_qkv(0, 1, 8 * T, 4, 4, 32)
    fn = functools.partial(ring_attn.ring_attention_global, mesh=ring_mesh(8), axis_name="sp", causal=True)
    hlo = jax.jit(functools.partial(fn, window=window)).lower(q, k, v).as_text()
    full = jax.jit(fn).lower(q, k, v).as_text()
    if steps <= 2:
        assert hlo.count("collective_permute") < full.count("collective_permute")


def test_window_with_zigzag_is_not_implemented():
    q, k, v, _ = random_qkv(1, 1, 16, 4, 4, 32)
    with pytest.raises(NotImplementedError, match="window with layout='zigzag'"):
        ring_attn.ring_attention(q, k, v, causal=True, window=4, layout="zigzag")
    with pytest.raises(ValueError, match="window must be a positive int or None, got 0"):
        ring_attn.ring_attention(q, k, v, causal=True, window=0)
