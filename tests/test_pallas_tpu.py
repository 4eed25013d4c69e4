"""The TPU Pallas kernels (pallas_kernels.attention_tpu), run in TPU interpret mode on the CPU,
against the float64 oracle: the same contract as the jnp kernels of test_kernel_contract.py.

Interpret mode costs seconds per compile and tens of milliseconds per grid step, so shapes are
tiny and each compiled kernel is reused for several (traced) offsets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, random_qkv, random_segments
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec

import reference
from pallas_kernels import attention_tpu, attention_xla

INTERPRET = pltpu.InterpretParams()


@functools.lru_cache(maxsize=None)
def kernels(*, causal, window, scale, block_q, block_kv):
    """Jitted forward + backward; offsets and segment ids are traced arguments."""
    kw = dict(causal=causal, window=window, scale=scale, block_q=block_q, block_kv=block_kv, interpret=INTERPRET)

    @jax.jit
    def run(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset):
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        out, lse = attention_tpu.attention_fwd(q, k, v, **masking, **kw)
        grads = attention_tpu.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)
        return out, lse, grads

    return run


def oracle(q, k, v, d_out, **masking):
    """float64 (out, lse) and the gradients of out for cotangent d_out."""
    with jax.enable_x64(True):
        q, k, v, d_out = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        fn = functools.partial(reference.attention_with_lse, dtype=jnp.float64, **masking)
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        grads = vjp((d_out, jnp.zeros_like(lse)))
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


def check_against_oracle(out, lse, grads, expected, dtype):
    expected_out, expected_lse, expected_grads = expected
    assert out.dtype == lse.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
    seen = np.isfinite(expected_lse)
    np.testing.assert_array_equal(np.isneginf(lse), ~seen, err_msg="rows that see no key have lse -inf")
    np.testing.assert_array_equal(np.asarray(out)[np.swapaxes(~seen, 1, 2)], 0.0, err_msg="and out 0")
    if seen.any():
        assert_close(out, expected_out, dtype=dtype, name="out")
        assert_close(np.asarray(lse)[seen], expected_lse[seen], dtype=dtype, name="lse")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        if np.linalg.norm(e) == 0:  # nothing visible: exactly zero
            np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=name)
        else:
            assert_close(g, e, dtype=dtype, kind="gradient", name=name)


CASES = [
    # (B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, [(q_offset, kv_offset), ...])
    # MHA on the diagonal; then shifted so that a whole tile is hidden and rows 5..11 see no key.
    (1, 32, 32, 4, 4, 64, 16, 16, True, None, False, jnp.float32, [(0, 0), (5, 12)]),
    # GQA 8:2, head dim 80 (padded to 128), segments; offsets that hide whole tiles.
    (1, 16, 32, 8, 2, 80, 16, 8, True, None, True, jnp.float32, [(20, 16), (40, 16)]),
    # MQA 4:1, head dim 128: keys wholly in the future (nothing visible), then wholly in the past.
    (1, 16, 32, 4, 1, 128, 8, 16, True, None, False, jnp.float32, [(0, 32), (31, 0)]),
    # Bidirectional with segments, GQA 4:2, head dim 32, batch 2, T != S.
    (2, 16, 24, 4, 2, 32, 8, 8, False, None, True, jnp.float32, [(0, 0)]),
    # bfloat16 inputs, float32 accumulation.
    (1, 32, 32, 4, 2, 64, 16, 16, True, None, False, jnp.bfloat16, [(0, 0), (16, 8)]),
    # Sliding windows, causal and bidirectional, skip tiles on both sides.
    (1, 32, 32, 2, 1, 64, 8, 8, True, 10, False, jnp.float32, [(0, 0), (8, 0)]),
    (1, 32, 32, 2, 2, 64, 8, 8, False, 6, True, jnp.float32, [(3, 0)]),
]


@pytest.mark.parametrize("B,T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,offsets", CASES)
def test_forward_and_backward_match_oracle(B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, offsets):
    q, k, v, d_out = random_qkv(T * S + H, B, T, N, K, H, S=S, dtype=dtype)
    q_ids = random_segments(T, B, T, 3) if segments else None
    kv_ids = random_segments(S + 1, B, S, 3) if segments else None
    run = kernels(causal=causal, window=window, scale=0.3, block_q=block_q, block_kv=block_kv)
    for q_offset, kv_offset in offsets:  # one compiled kernel for every offset
        out, lse, grads = run(q, k, v, d_out, q_ids, kv_ids, jnp.int32(q_offset), jnp.int32(kv_offset))
        expected = oracle(
            q, k, v, d_out, causal=causal, window=window, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
            scale=0.3, q_offset=q_offset, kv_offset=kv_offset,
        )
        check_against_oracle(out, lse, grads, expected, dtype)


def test_given_delta_replaces_out():
    q, k, v, d_out = random_qkv(7, 1, 16, 2, 1, 64)
    kw = dict(causal=True, scale=0.3, block_q=8, block_kv=8, interpret=INTERPRET)
    out, lse = attention_tpu.attention_fwd(q, k, v, **kw)
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out, out)
    with_out = attention_tpu.attention_bwd(q, k, v, out, lse, d_out, **kw)
    with_delta = attention_tpu.attention_bwd(q, k, v, None, lse, d_out, delta=delta, **kw)
    for a, b in zip(with_out, with_delta):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_tiles_hidden_by_traced_offsets_are_skipped_not_masked():
    # NaN in every key/value tile that causality hides from all queries: a computed-then-masked
    # tile would spread it (0 * NaN), a skipped one cannot. Offsets are traced, as in a ring.
    T, S = 16, 32
    q, k, v, d_out = random_qkv(5, 1, T, 4, 2, 32, S=S)
    run = kernels(causal=True, window=None, scale=0.2, block_q=8, block_kv=8)
    for q_offset, kv_offset, first_hidden in ((0, 0, 16), (8, 16, 8)):  # q positions end at 15 / 23
        hidden = (np.arange(S) >= first_hidden)[None, :, None, None]
        k_nan, v_nan = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)
        out, lse, (dq, dk, dv) = run(q, k_nan, v_nan, d_out, None, None, jnp.int32(q_offset), jnp.int32(kv_offset))
        assert np.all(np.isfinite(np.asarray(out))), "a tile wholly above the diagonal was computed"
        assert np.all(np.isfinite(np.asarray(dq))), "the dq kernel computed a tile wholly above the diagonal"
        np.testing.assert_array_equal(np.asarray(dk)[:, first_hidden:], 0.0, err_msg="the dk/dv kernel computed it")
        np.testing.assert_array_equal(np.asarray(dv)[:, first_hidden:], 0.0)
        expected = oracle(q, k, v, d_out, causal=True, scale=0.2, q_offset=q_offset, kv_offset=kv_offset)
        check_against_oracle(out, lse, (dq, dk, dv), expected, jnp.float32)


def test_tiles_with_no_common_segment_are_skipped():
    T = S = 32
    q, k, v, _ = random_qkv(6, 1, T, 2, 1, 32)
    ids = jnp.asarray(np.repeat(np.arange(4), 8)[None], jnp.int32)  # one document per tile of 8
    v_nan = v.at[:, 8:16].set(jnp.nan)  # document 1's values; only document 1's queries may read them
    out, _ = attention_tpu.attention_fwd(
        q, k, v_nan, q_segment_ids=ids, kv_segment_ids=ids, scale=0.2, block_q=8, block_kv=8, interpret=INTERPRET
    )
    out = np.asarray(out)
    assert np.all(np.isfinite(out[:, :8])) and np.all(np.isfinite(out[:, 16:])), "a tile with no common segment was computed"
    assert np.all(np.isnan(out[:, 8:16])), "document 1 must read its own values"


@pytest.mark.parametrize("causal,window", [(True, None), (True, 11), (False, 11)])
def test_index_maps_clamp_skipped_tiles_onto_a_fetched_block(causal, window):
    # A skipped step must reuse the block index of a neighbouring step (no new DMA), and a
    # visible tile must get its own block.
    bq, bk, nq, nk = 8, 4, 3, 6
    mask = attention_tpu._Mask(causal=causal, window=window, segments=False, block_q=bq, block_kv=bk,
                               num_q_blocks=nq, num_kv_blocks=nk)
    rng = np.random.default_rng(0)
    for q_offset, kv_offset in [(0, 0), (40, 0), (0, 40), *rng.integers(0, 48, (12, 2))]:
        offsets = np.array([q_offset, kv_offset], np.int32)
        for i in range(nq):
            kv_blocks = [int(mask.clamp_kv_block(i, j, offsets)) for j in range(nk)]
            visible = [bool(mask.tile_visible(0, i, j, offsets, None, None)) for j in range(nk)]
            check_clamped(kv_blocks, visible)
        for j in range(nk):
            q_blocks = [int(mask.clamp_q_block(i, j, offsets)) for i in range(nq)]
            visible = [bool(mask.tile_visible(0, i, j, offsets, None, None)) for i in range(nq)]
            check_clamped(q_blocks, visible)


def check_clamped(blocks, visible):
    assert all(0 <= b < len(blocks) for b in blocks)
    assert all(b == n for n, (b, seen) in enumerate(zip(blocks, visible)) if seen), (blocks, visible)
    if any(visible):  # skipped steps sit at the ends and repeat the nearest visible block
        first, last = visible.index(True), len(visible) - 1 - visible[::-1].index(True)
        assert set(blocks) == set(range(first, last + 1)), (blocks, visible)
    else:
        assert len(set(blocks)) == 1, blocks


@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_shard_map(check_vma):
    # The ring calls the kernels per device with offsets derived from the device's position.
    mesh = Mesh(np.array(jax.devices()[:2]), ("sp",))
    q, k, v, d_out = random_qkv(8, 1, 16, 2, 1, 32)

    def local(impl, q, k, v, d_out):
        extra = dict(interpret=INTERPRET) if impl is attention_tpu else {}
        kw = dict(causal=True, scale=0.3, block_q=8, block_kv=8, q_offset=8 * jax.lax.axis_index("sp"), **extra)
        out, lse = impl.attention_fwd(q, k, v, **kw)
        return out, lse, *impl.attention_bwd(q, k, v, out, lse, d_out, **kw)

    spec = PartitionSpec(None, "sp")
    out_specs = (spec, PartitionSpec(None, None, "sp"), spec, spec, spec)
    results = [
        jax.jit(jax.shard_map(functools.partial(local, impl), mesh=mesh, in_specs=spec, out_specs=out_specs,
                              check_vma=check_vma))(q, k, v, d_out)
        for impl in (attention_tpu, attention_xla)
    ]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(N=3), "multiple of key/value heads"),
        (dict(block_q=6), "must divide"),
        (dict(q_segment_ids=True), "give both"),
        (dict(window=0), "window must be a positive int"),
        (dict(interpret=None), "on TPU block_q=8 must be a multiple of 128"),
    ],
)
def test_bad_inputs_raise(change, message):
    N = change.pop("N", 4)
    q, k, v, _ = random_qkv(0, 1, 16, N, 2, 32)
    kw = dict(scale=0.1, block_q=8, block_kv=8, interpret=INTERPRET)
    if change.pop("q_segment_ids", False):
        kw["q_segment_ids"] = random_segments(1, 1, 16)
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        attention_tpu.attention_fwd(q, k, v, **kw)
