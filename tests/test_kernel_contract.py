"""The per-shard kernel contract (pallas_kernels, impl="xla") against the float64 oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, oracle_with_lse, random_qkv, random_segments

import pallas_kernels
import reference

CASES = [
    # (T, S, N, K, H, block_q, block_kv, q_offset, kv_offset, causal, segments)
    (32, 32, 4, 4, 64, 8, 8, 0, 0, True, False),
    (24, 40, 8, 2, 80, 8, 8, 40, 16, True, True),  # offsets that mask whole tiles
    (16, 48, 4, 1, 128, 16, 16, 0, 32, True, False),  # keys wholly in the future: every row sees nothing
    (17, 9, 4, 2, 64, 17, 9, 0, 0, False, True),  # one tile plus one: odd lengths, a single tile each
    (32, 32, 8, 4, 64, 16, 8, 7, 3, False, False),
]


@pytest.mark.parametrize("T,S,N,K,H,block_q,block_kv,q_offset,kv_offset,causal,segments", CASES)
def test_forward_returns_out_and_lse(T, S, N, K, H, block_q, block_kv, q_offset, kv_offset, causal, segments):
    q, k, v, _ = random_qkv(T * S, 2, T, N, K, H, S=S)
    q_ids = random_segments(1, 2, T, 3) if segments else None
    kv_ids = random_segments(2, 2, S, 3) if segments else None
    fwd = jax.jit(
        functools.partial(
            pallas_kernels.attention_fwd, impl="xla", causal=causal, scale=0.3, block_q=block_q, block_kv=block_kv
        )
    )
    # Offsets are traced: one compiled kernel serves every ring step.
    out, lse = fwd(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=jnp.int32(q_offset), kv_offset=jnp.int32(kv_offset))
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    expected, expected_lse = oracle_with_lse(
        q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=0.3, q_offset=q_offset, kv_offset=kv_offset
    )
    assert_close(out, expected, name="out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse), err_msg="rows that see no key")
    seen = np.isfinite(expected_lse)
    assert_close(np.asarray(lse)[seen], expected_lse[seen], name="lse")
    np.testing.assert_array_equal(np.asarray(out)[np.swapaxes(~seen, 1, 2)], 0.0)


@pytest.mark.parametrize("T,S,N,K,H,block_q,block_kv,q_offset,kv_offset,causal,segments", CASES)
def test_backward_matches_oracle_gradients(T, S, N, K, H, block_q, block_kv, q_offset, kv_offset, causal, segments):
    q, k, v, d_out = random_qkv(T + S, 2, T, N, K, H, S=S)
    q_ids = random_segments(3, 2, T, 3) if segments else None
    kv_ids = random_segments(4, 2, S, 3) if segments else None
    masking = dict(causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
    kernel = dict(impl="xla", scale=0.3, block_q=block_q, block_kv=block_kv)
    out, lse = pallas_kernels.attention_fwd(q, k, v, **masking, **kernel)
    grads = jax.jit(functools.partial(pallas_kernels.attention_bwd, **masking, **kernel))(q, k, v, out, lse, d_out)
    with jax.enable_x64(True):
        q64, k64, v64, do64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        _, vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, scale=0.3, dtype=jnp.float64, **masking), q64, k64, v64)
        expected = [np.asarray(g) for g in vjp(do64)]
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected):
        assert g.dtype == jnp.float32
        if np.linalg.norm(e) == 0:  # nothing visible: exactly zero
            np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=name)
        else:
            assert_close(g, e, kind="gradient", name=name)


def test_tiles_above_the_diagonal_are_skipped_not_masked():
    # NaN in every key/value tile that causality hides entirely: a computed-then-masked tile
    # would spread it (0 * NaN), a skipped one cannot.
    T = S = 32
    q, k, v, d_out = random_qkv(5, 1, T, 4, 4, 32)
    hidden = np.zeros((1, S, 1, 1), bool)
    hidden[:, 16:] = True  # tiles 2 and 3 of size 8, seen by no query of tiles 0 and 1
    k_nan = jnp.where(hidden, jnp.nan, k)
    v_nan = jnp.where(hidden, jnp.nan, v)
    q_top, do_top = q[:, :16], d_out[:, :16]
    kw = dict(impl="xla", causal=True, scale=0.2, block_q=8, block_kv=8)
    out, lse = pallas_kernels.attention_fwd(q_top, k_nan, v_nan, **kw)
    assert np.all(np.isfinite(np.asarray(out))), "a tile wholly above the diagonal was computed"
    out_ref, _ = pallas_kernels.attention_fwd(q_top, k[:, :16], v[:, :16], **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=1e-6)
    dq, dk, dv = pallas_kernels.attention_bwd(q_top, k_nan, v_nan, out, lse, do_top, **kw)
    assert np.all(np.isfinite(np.asarray(dq))), "the backward computed a tile wholly above the diagonal"
    np.testing.assert_array_equal(np.asarray(dk)[:, 16:], 0.0)


def test_tiles_with_no_common_segment_are_skipped():
    T = 32
    q, k, v, _ = random_qkv(6, 1, T, 4, 4, 32)
    ids = jnp.asarray(np.repeat(np.arange(4), 8)[None], jnp.int32)  # one document per tile of 8
    v_nan = v.at[:, 8:16].set(jnp.nan)  # document 1's values; only document 1's queries may read them
    out, _ = pallas_kernels.attention_fwd(
        q, k, v_nan, q_segment_ids=ids, kv_segment_ids=ids, impl="xla", scale=0.2, block_q=8, block_kv=8
    )
    out = np.asarray(out)
    assert np.all(np.isfinite(out[:, :8])) and np.all(np.isfinite(out[:, 16:])), "a tile with no common segment was computed"
    assert np.all(np.isnan(out[:, 8:16])), "document 1 must read its own values"
