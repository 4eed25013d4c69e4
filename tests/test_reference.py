"""The oracle itself, checked against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv, random_segments

import reference


@pytest.mark.parametrize("causal", [False, True])
def test_attention_agrees_with_jax_dot_product_attention(causal):
    q, k, v, _ = random_qkv(0, 2, 24, 8, 2, 32)
    ids = random_segments(1, 2, 24)
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]  # [B, 1, T, S]
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
    got = reference.attention(q, k, v, causal=causal, q_segment_ids=ids, kv_segment_ids=ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)


def test_attention_agrees_with_numpy_float64():
    q, k, v, _ = random_qkv(2, 1, 8, 2, 1, 16, S=12)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btnh,bsh->bnts", qn, kn[:, :, 0]) / 4.0
    s = np.where(np.arange(8)[:, None] >= np.arange(12)[None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsh->btnh", p, vn[:, :, 0])
    with jax.enable_x64(True):
        got = reference.attention(*(jnp.asarray(x) for x in (qn, kn, vn)), causal=True, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)


def test_soft_cap_and_sinks_agree_with_numpy_float64():
    # Gemma 2's cap on the scaled scores; gpt-oss's sink as one more softmax column with no value.
    # Query 0 sees one key, and with a segment id of its own, query 7 sees none: out 0, lse = sink.
    q, k, v, _ = random_qkv(7, 1, 8, 2, 1, 16, S=12)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    cap, sinks = 1.5, np.array([0.7, -1.2])
    ids_q = np.array([[0, 0, 0, 0, 0, 0, 0, 1]])
    ids_kv = np.zeros((1, 12), np.int64)
    s = np.einsum("btnh,bsh->bnts", qn, kn[:, :, 0]) / 4.0
    s = cap * np.tanh(s / cap)
    visible = (np.arange(8)[:, None] >= np.arange(12)[None, :]) & (ids_q[0][:, None] == ids_kv[0][None, :])
    s = np.where(visible, s, -np.inf)
    with_sink = np.concatenate([s, np.broadcast_to(sinks[None, :, None, None], (1, 2, 8, 1))], -1)
    p = np.exp(with_sink - with_sink.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsh->btnh", p[..., :-1], vn[:, :, 0])
    expected_lse = np.log(np.exp(with_sink).sum(-1))
    with jax.enable_x64(True):
        out, lse = reference.attention_with_lse(
            *(jnp.asarray(x) for x in (qn, kn, vn)), causal=True, logit_soft_cap=cap, sinks=jnp.asarray(sinks),
            q_segment_ids=jnp.asarray(ids_q), kv_segment_ids=jnp.asarray(ids_kv), dtype=jnp.float64,
        )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(lse), expected_lse, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(out)[0, 7], 0.0)
    np.testing.assert_allclose(np.asarray(lse)[0, :, 7], sinks, rtol=1e-12)


def test_merge_of_two_key_halves_is_exact():
    q, k, v, _ = random_qkv(3, 2, 16, 4, 2, 32, S=32)
    ids_q = random_segments(4, 2, 16, 2)
    ids_kv = random_segments(5, 2, 32, 2)
    kw = dict(q_segment_ids=ids_q)
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in (q, k, v))
        whole = reference.attention_with_lse(q, k, v, kv_segment_ids=ids_kv, dtype=jnp.float64, **kw)
        first = reference.attention_with_lse(
            q, k[:, :16], v[:, :16], kv_segment_ids=ids_kv[:, :16], dtype=jnp.float64, **kw
        )
        second = reference.attention_with_lse(
            q, k[:, 16:], v[:, 16:], kv_segment_ids=ids_kv[:, 16:], kv_offset=16, dtype=jnp.float64, **kw
        )
        merged = reference.merge_partials(*first, *second)
    np.testing.assert_allclose(np.asarray(merged[0]), np.asarray(whole[0]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(merged[1]), np.asarray(whole[1]), rtol=1e-12)


def test_swiglu_agrees_with_numpy():
    rng = np.random.default_rng(6)
    x, wg, wu, wd = (rng.standard_normal((2, 8, 16)), rng.standard_normal((16, 40)), rng.standard_normal((16, 40)),
                     rng.standard_normal((40, 16)))
    g = x @ wg
    expected = (g / (1 + np.exp(-g)) * (x @ wu)) @ wd
    with jax.enable_x64(True):
        got = reference.swiglu(*(jnp.asarray(a) for a in (x, wg, wu, wd)), dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10)
