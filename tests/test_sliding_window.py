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


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def _sends(jaxpr):
    return any(eqn.primitive.name == "ppermute" or any(_sends(j) for j in _sub_jaxprs(eqn)) for eqn in jaxpr.eqns)


def _ring_loop_lengths(jaxpr):
    """The trip counts of the scans that send (the ring's loops), nested ones included."""
    lengths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and _sends(eqn.params["jaxpr"].jaxpr):
            lengths.append(eqn.params["length"])
        for sub in _sub_jaxprs(eqn):
            lengths += _ring_loop_lengths(sub)
    return lengths


@pytest.mark.parametrize("window,steps", [(1, 1), (T, 2), (T + 1, 2), (T + 2, 3), (3 * T, 4), (100 * T, 8)])
def test_causal_window_stops_the_ring_after_the_hops_it_reaches(window, steps):
    assert steps_needed(8, T, causal=True, window=window) == steps
    # The forward's loop runs one iteration a step; one step needs no loop (and sends nothing).
    q, k, v, _ = random_qkv(0, 1, 8 * T, 4, 4, 32)
    fn = functools.partial(ring_attn.ring_attention_global, mesh=ring_mesh(8), axis_name="sp", causal=True)
    lengths = _ring_loop_lengths(jax.make_jaxpr(functools.partial(fn, window=window))(q, k, v).jaxpr)
    assert lengths == ([steps] if steps > 1 else []), (steps, lengths)


def test_window_with_zigzag_is_not_implemented():
    q, k, v, _ = random_qkv(1, 1, 16, 4, 4, 32)
    with pytest.raises(NotImplementedError, match="window with layout='zigzag'"):
        ring_attn.ring_attention(q, k, v, causal=True, window=4, layout="zigzag")
    with pytest.raises(ValueError, match="window must be a positive int or None, got 0"):
        ring_attn.ring_attention(q, k, v, causal=True, window=0)
