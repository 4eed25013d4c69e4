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
from conftest import assert_kernel_matches_oracle, random_qkv, random_segments
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec

import reference
from pallas_kernels import attention_tpu

INTERPRET = pltpu.InterpretParams()
# Interpret mode compiles large CPU programs; XLA's backend optimisations only cost time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def kernels(*, causal, window, scale, block_q, block_kv, given_delta):
    """Jitted forward + backward; offsets and segment ids are traced arguments. `given_delta`:
    the backward gets `delta` and no `out`."""
    kw = dict(causal=causal, window=window, scale=scale, block_q=block_q, block_kv=block_kv, interpret=INTERPRET)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset):
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        out, lse = attention_tpu.attention_fwd(q, k, v, **masking, **kw)
        if given_delta:
            delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out)
            grads = attention_tpu.attention_bwd(q, k, v, None, lse, d_out, delta=delta, **masking, **kw)
        else:
            grads = attention_tpu.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)
        return out, lse, grads

    return run


def oracle(q, k, v, d_out, q_ids=None, kv_ids=None, q_offset=0, kv_offset=0, **static):
    """float64 (out, lse) and the gradients of out for cotangent d_out."""
    with jax.enable_x64(True):
        q, k, v, d_out = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        out, lse, grads = _oracle(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, **static)
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale"), compiler_options=FAST_COMPILE)
def _oracle(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, *, causal=False, window=None, scale):
    fn = functools.partial(
        reference.attention_with_lse, dtype=jnp.float64, causal=causal, window=window, scale=scale,
        q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset,
    )
    (out, lse), vjp = jax.vjp(fn, q, k, v)
    return out, lse, vjp((d_out, jnp.zeros_like(lse)))


CASES = [
    # (B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, [(q_offset, kv_offset), ...])
    # MHA, shifted so that a whole tile is hidden, rows 5..11 see no key, and diagonal tiles mask.
    (1, 32, 32, 4, 4, 64, 16, 16, True, None, False, jnp.float32, [(5, 12)]),
    # GQA 8:2, head dim 80 (padded to 128), segments; the second key tile is hidden.
    (1, 16, 32, 8, 2, 80, 16, 16, True, None, True, jnp.float32, [(20, 24)]),
    # MQA 4:1, head dim 128, bfloat16 (the backward gets delta instead of out): keys wholly in the
    # future (nothing visible), then across the diagonal.
    (1, 16, 32, 4, 1, 128, 16, 16, True, None, False, jnp.bfloat16, [(0, 32), (8, 4)]),
    # Bidirectional sliding window with segments, GQA 2:1, head dim 32, batch 2, T != S.
    (2, 16, 24, 2, 1, 32, 8, 8, False, 6, True, jnp.float32, [(3, 0)]),
    # Causal sliding window: tiles skipped on both sides.
    (1, 24, 24, 2, 1, 64, 8, 8, True, 10, False, jnp.float32, [(8, 0)]),
]


@pytest.mark.parametrize("B,T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,offsets", CASES)
def test_forward_and_backward_match_oracle(
    B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, offsets
):
    q, k, v, d_out = random_qkv(T * S + H, B, T, N, K, H, S=S, dtype=dtype)
    q_ids = random_segments(T, B, T, 3) if segments else None
    kv_ids = random_segments(S + 1, B, S, 3) if segments else None
    static = dict(causal=causal, window=window, scale=0.3)
    run = kernels(**static, block_q=block_q, block_kv=block_kv, given_delta=dtype == jnp.bfloat16)
    for q_offset, kv_offset in offsets:  # one compiled kernel for every offset
        out, lse, grads = run(q, k, v, d_out, q_ids, kv_ids, jnp.int32(q_offset), jnp.int32(kv_offset))
        expected = oracle(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, **static)
        assert_kernel_matches_oracle(out, lse, grads, expected, dtype)


def test_tiles_hidden_by_traced_offsets_are_skipped_not_masked():
    # NaN in every key/value tile that causality hides from all queries: a computed-then-masked
    # tile would spread it (0 * NaN), a skipped one cannot. Offsets are traced, as in a ring.
    # (In the forward and dq kernels the clamped index maps never even fetch the NaN tile.)
    q, k, v, d_out = random_qkv(5, 1, 32, 4, 4, 64)
    run = kernels(causal=True, window=None, scale=0.3, block_q=16, block_kv=16, given_delta=False)  # as CASES[0]
    # Queries at 0..31, keys at 16..47: the second key tile (32..47) is above the diagonal.
    k_nan, v_nan = k.at[:, 16:].set(jnp.nan), v.at[:, 16:].set(jnp.nan)
    out, lse, (dq, dk, dv) = run(q, k_nan, v_nan, d_out, None, None, jnp.int32(0), jnp.int32(16))
    assert np.all(np.isfinite(np.asarray(out))), "a tile wholly above the diagonal was computed"
    assert np.all(np.isfinite(np.asarray(dq))), "the dq kernel computed a tile wholly above the diagonal"
    np.testing.assert_array_equal(np.asarray(dk)[:, 16:], 0.0, err_msg="the dk/dv kernel computed it")
    np.testing.assert_array_equal(np.asarray(dv)[:, 16:], 0.0)
    expected = oracle(q, k, v, d_out, q_offset=0, kv_offset=16, causal=True, scale=0.3)
    assert_kernel_matches_oracle(out, lse, (dq, dk, dv), expected, jnp.float32)


def test_tiles_with_no_common_segment_are_skipped():
    # Shapes and statics of CASES[3] (compiled once); one document per tile, so disjoint ranges.
    q, k, v, d_out = random_qkv(6, 2, 16, 2, 1, 32, S=24)
    q_ids = jnp.asarray(np.repeat([[0, 1], [1, 2]], 8, axis=1), jnp.int32)
    kv_ids = jnp.asarray(np.repeat([[0, 1, 2], [0, 1, 2]], 8, axis=1), jnp.int32)
    v_nan = v.at[0, 16:].set(jnp.nan)  # document 2 of batch row 0: no query of that row reads it
    run = kernels(causal=False, window=6, scale=0.3, block_q=8, block_kv=8, given_delta=False)
    out, lse, (dq, dk, dv) = run(q, k, v_nan, d_out, q_ids, kv_ids, jnp.int32(3), jnp.int32(0))
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.all(np.isfinite(np.asarray(x))), f"{name}: a tile with no common segment was computed"
    np.testing.assert_array_equal(np.asarray(dv)[0, 16:], 0.0)
    expected = oracle(q, k, v, d_out, q_ids, kv_ids, 3, 0, causal=False, window=6, scale=0.3)
    assert_kernel_matches_oracle(out, lse, (dq, dk, dv), expected, jnp.float32)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 11), (False, 11)])
def test_tile_skipping_and_index_clamping(causal, window):
    # A tile is skipped exactly when no query of it sees a key of the other; a skipped step
    # reuses the block index of a neighbouring step (no new DMA), a visible tile gets its own
    # block. The predicate and index maps are elementwise: evaluate them on whole grids,
    # [offset pairs, q block, kv block].
    bq, bk, nq, nk = 8, 4, 3, 6
    mask = attention_tpu._Mask(causal=causal, window=window, segments=False, block_q=bq, block_kv=bk,
                               num_q_blocks=nq, num_kv_blocks=nk)
    rng = np.random.default_rng(0)
    pairs = np.concatenate([[[0, 0], [40, 0], [0, 40]], rng.integers(0, 48, (40, 2))]).astype(np.int32)
    offsets = (pairs[:, 0, None, None], pairs[:, 1, None, None])
    i, j = np.arange(nq)[None, :, None], np.arange(nk)[None, None, :]
    visible = np.broadcast_to(np.asarray(mask.tile_visible(0, i, j, offsets, None, None)), (len(pairs), nq, nk))
    kv_blocks = np.broadcast_to(np.asarray(mask.clamp_kv_block(i, j, offsets)), visible.shape)
    q_blocks = np.broadcast_to(np.asarray(mask.clamp_q_block(i, j, offsets)), visible.shape)
    for p, (q_offset, kv_offset) in enumerate(pairs):
        distance = (q_offset + np.arange(nq * bq))[:, None] - (kv_offset + np.arange(nk * bk))[None, :]
        sees = np.ones_like(distance, bool)
        if causal:
            sees &= distance >= 0
        if window is not None:
            sees &= (distance < window) & (causal | (distance > -window))
        np.testing.assert_array_equal(visible[p], sees.reshape(nq, bq, nk, bk).any(axis=(1, 3)))
        for row in range(nq):
            check_clamped(kv_blocks[p, row], visible[p, row])
        for col in range(nk):
            check_clamped(q_blocks[p, :, col], visible[p, :, col])


def check_clamped(blocks, visible):
    blocks, visible = list(blocks), list(visible)
    assert all(0 <= b < len(blocks) for b in blocks)
    assert all(b == n for n, (b, seen) in enumerate(zip(blocks, visible)) if seen), (blocks, visible)
    if any(visible):  # skipped steps sit at the ends and repeat the nearest visible block
        first, last = visible.index(True), len(visible) - 1 - visible[::-1].index(True)
        assert blocks == sorted(blocks) and set(blocks) == set(range(first, last + 1)), (blocks, visible)
    else:
        assert len(set(blocks)) == 1, blocks


def test_inside_shard_map_with_vma_checks():
    # The ring calls the kernels per device, offsets derived from the device's position; under
    # check_vma=True pallas_call needs its outputs' manual axis types.
    mesh = Mesh(np.array(jax.devices()[:2]), ("sp",))
    q, k, v, d_out = random_qkv(8, 1, 16, 2, 1, 32)
    kw = dict(causal=True, scale=0.3, block_q=8, block_kv=8)

    def local(q, k, v, d_out):
        offsets = dict(q_offset=8 * jax.lax.axis_index("sp"), kv_offset=0)
        out, lse = attention_tpu.attention_fwd(q, k, v, **offsets, **kw, interpret=INTERPRET)
        return out, lse, *attention_tpu.attention_bwd(q, k, v, out, lse, d_out, **offsets, **kw, interpret=INTERPRET)

    spec = PartitionSpec(None, "sp")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, None, None, spec),
                            out_specs=(spec, PartitionSpec(None, None, "sp"), spec, spec, spec), check_vma=True)
    out, lse, dq, dk, dv = jax.jit(sharded, compiler_options=FAST_COMPILE)(q, k[:, :8], v[:, :8], d_out)
    # dk/dv come back per device, concatenated along the sequence: sum the two devices' parts.
    dk, dv = (x[:, :8] + x[:, 8:] for x in (dk, dv))
    expected = oracle(q, k[:, :8], v[:, :8], d_out, causal=True, scale=0.3)
    assert_kernel_matches_oracle(out, lse, (dq, dk, dv), expected, jnp.float32)


@pytest.mark.parametrize(
    "dtype,causal,window,segments", [(jnp.bfloat16, True, None, True), (jnp.float32, False, 200, False)]
)
def test_lowers_to_mosaic_for_tpu(dtype, causal, window, segments):
    # Cross-lowering runs Pallas' TPU (Mosaic) lowering on this CPU: block shapes must satisfy the
    # TPU tiling rules and every op in kernels and index maps must have a Mosaic lowering.
    B, T, S, N, K, H = 2, 256, 384, 8, 2, 80
    q = jax.ShapeDtypeStruct((B, T, N, H), dtype)
    k = jax.ShapeDtypeStruct((B, S, K, H), dtype)
    ids = (None, None)
    if segments:
        ids = (jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, S), jnp.int32))
    offset = jax.ShapeDtypeStruct((), jnp.int32)
    kw = dict(causal=causal, window=window, scale=0.1, block_q=128, block_kv=128)

    def fwd_bwd(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset):
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        out, lse = attention_tpu.attention_fwd(q, k, v, **masking, **kw)
        return out, lse, attention_tpu.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)

    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, k, k, q, *ids, offset, offset)
    module = exported.mlir_module()
    for name in ("ring_attn_tpu_fwd", "ring_attn_tpu_bwd_dq", "ring_attn_tpu_bwd_dkv"):
        assert name in module


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
    change = dict(change)
    N = change.pop("N", 4)
    q, k, v, _ = random_qkv(0, 1, 16, N, 2, 32)
    kw = dict(scale=0.1, block_q=8, block_kv=8, interpret=INTERPRET)
    if change.pop("q_segment_ids", False):
        kw["q_segment_ids"] = random_segments(1, 1, 16)
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        attention_tpu.attention_fwd(q, k, v, **kw)
