"""The TPU Pallas kernels (pallas_kernels.attention_tpu), run in TPU interpret mode on the CPU,
against the float64 oracle: the same contract as the jnp kernels of test_kernel_contract.py.

Interpret mode costs seconds per compile and tens of milliseconds per grid step, so shapes are
tiny and each compiled kernel is reused for several (traced) offsets.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, assert_kernel_matches_oracle, kernel_oracle, random_qkv, random_segments
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import attention_tpu

INTERPRET = pltpu.InterpretParams()


@pytest.mark.parametrize("causal,window", [(True, None), (True, 11), (False, 11)])
def test_tile_skipping_and_index_clamping(causal, window):
    # A tile is skipped exactly when no query of it sees a key of the other; a skipped step
    # reuses the block index of a neighbouring step (no new DMA), a visible tile gets its own
    # block. The predicate and index maps are elementwise: evaluate them on whole grids,
    # [offset pairs, q block, kv block].
    bq, bk, nq, nk = 8, 4, 3, 6
    mask = attention_tpu.TileMask(causal=causal, window=window, segments=False, block_q=bq, block_kv=bk,
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
    expected = kernel_oracle(q, k[:, :8], v[:, :8], d_out, causal=True)
    assert_kernel_matches_oracle(out, lse, (dq, dk, dv), expected, jnp.float32)


@pytest.mark.parametrize(
    "dtype,causal,window,segments,logit_soft_cap",
    [(jnp.bfloat16, True, None, True, None), (jnp.float32, False, 200, False, 30.0)],
)
def test_lowers_to_mosaic_for_tpu(dtype, causal, window, segments, logit_soft_cap):
    # Cross-lowering runs Pallas' TPU (Mosaic) lowering on this CPU: block shapes must satisfy the
    # TPU tiling rules and every op in kernels and index maps must have a Mosaic lowering.
    B, T, S, N, K, H = 2, 256, 384, 8, 2, 80
    q = jax.ShapeDtypeStruct((B, T, N, H), dtype)
    k = jax.ShapeDtypeStruct((B, S, K, H), dtype)
    ids = (None, None)
    if segments:
        ids = (jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, S), jnp.int32))
    offset = jax.ShapeDtypeStruct((), jnp.int32)
    kw = dict(causal=causal, window=window, scale=0.1, logit_soft_cap=logit_soft_cap, block_q=128, block_kv=128)

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
