"""The GPU Pallas kernels (pallas_kernels.attention_triton), run in interpret mode on the CPU,
against the float64 oracle: the same contract as the jnp kernels of test_kernel_contract.py.

Interpret mode costs seconds per compile, so shapes are tiny and each compiled kernel is reused
for several (traced) offsets. That the kernels also lower to Triton for CUDA is checked by
exporting them for that platform, which needs no GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_kernel_matches_oracle, random_qkv, random_segments
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import triton as plgpu
from jax.sharding import Mesh, PartitionSpec

import reference
from pallas_kernels import attention_triton, attention_xla, gpu_tiling

TRITON_CALL_TARGET = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
# Interpret mode's cost is XLA compiling the interpreter's loops, not running them: skip the
# backend optimisations (about 3x faster to compile).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def kernels(*, causal, window, scale, block_q, block_kv):
    """Jitted forward + backward; offsets and segment ids are traced arguments."""
    kw = dict(causal=causal, window=window, scale=scale, block_q=block_q, block_kv=block_kv, interpret=True)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset):
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        out, lse = attention_triton.attention_fwd(q, k, v, **masking, **kw)
        grads = attention_triton.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)
        return out, lse, grads

    return run


def oracle(q, k, v, d_out, *, causal=False, window=None, scale, q_segment_ids=None, kv_segment_ids=None,
           q_offset=0, kv_offset=0):
    """float64 (out, lse) and the gradients of out for cotangent d_out."""
    with jax.enable_x64(True):
        q, k, v, d_out = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        run = _oracle(causal=causal, window=window, scale=scale)
        out, lse, grads = run(q, k, v, d_out, q_segment_ids, kv_segment_ids, q_offset, kv_offset)
        return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]


@functools.cache
def _oracle(*, causal, window, scale):
    @jax.jit
    def run(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset):
        fn = functools.partial(
            reference.attention_with_lse, causal=causal, window=window, scale=scale, q_segment_ids=q_ids,
            kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset, dtype=jnp.float64,
        )
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return out, lse, vjp((d_out, jnp.zeros_like(lse)))

    return run


def run_case(B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, offsets, seed=0):
    q, k, v, d_out = random_qkv(T * S + H + seed, B, T, N, K, H, S=S, dtype=dtype)
    q_ids = random_segments(T + seed, B, T, 3) if segments else None
    kv_ids = random_segments(S + 1 + seed, B, S, 3) if segments else None
    run = kernels(causal=causal, window=window, scale=0.3, block_q=block_q, block_kv=block_kv)
    for q_offset, kv_offset in offsets:  # one compiled kernel for every offset
        out, lse, grads = run(q, k, v, d_out, q_ids, kv_ids, jnp.int32(q_offset), jnp.int32(kv_offset))
        expected = oracle(
            q, k, v, d_out, causal=causal, window=window, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
            scale=0.3, q_offset=q_offset, kv_offset=kv_offset,
        )
        assert_kernel_matches_oracle(out, lse, grads, expected, dtype)


CASES = [
    # (B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, [(q_offset, kv_offset), ...])
    # MHA on the diagonal; then shifted so that a whole tile is hidden and rows 0..6 see no key.
    (1, 32, 32, 4, 4, 64, 16, 16, True, None, False, jnp.float32, [(0, 0), (5, 12)]),
    # GQA 8:2, head dim 80 (padded to 128), segments, key blocks of 8 (padded to 16); offsets
    # that hide whole tiles.
    (1, 16, 32, 8, 2, 80, 16, 8, True, None, True, jnp.float32, [(20, 16), (40, 16)]),
    # MQA 4:1, head dim 128, query blocks of 8: keys wholly in the future (nothing visible), then
    # wholly in the past.
    (1, 16, 32, 4, 1, 128, 8, 16, True, None, False, jnp.float32, [(0, 32), (31, 0)]),
    # Bidirectional with segments, GQA 4:2, head dim 32, batch 2, T != S, blocks of 12 and 24.
    (2, 24, 48, 4, 2, 32, 12, 24, False, None, True, jnp.float32, [(0, 0)]),
    # bfloat16 inputs, float32 accumulation.
    (1, 32, 32, 4, 2, 64, 16, 16, True, None, False, jnp.bfloat16, [(0, 0), (16, 8)]),
    # A causal sliding window over blocks of 128, which run as tiles of 64: skips on both sides.
    (1, 128, 128, 2, 1, 32, 128, 128, True, 10, False, jnp.float32, [(0, 0), (72, 0)]),
    # A bidirectional window with segments.
    (1, 32, 32, 2, 2, 64, 8, 8, False, 6, True, jnp.float32, [(3, 0)]),
]


@pytest.mark.parametrize("B,T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,offsets", CASES)
def test_forward_and_backward_match_oracle(
    B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, offsets
):
    run_case(B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, offsets)


@settings(max_examples=3)
@given(
    block_q=st.sampled_from([4, 8, 12, 16, 24, 48]),
    block_kv=st.sampled_from([4, 8, 16, 24, 48]),
    causal=st.booleans(),
    offsets=st.tuples(st.integers(0, 48), st.integers(0, 48)),
)
def test_any_block_sizes_that_divide_the_lengths(block_q, block_kv, causal, offsets):
    run_case(
        1, 48, 48, 2, 1, 64, block_q, block_kv, causal, None, True, jnp.float32, [offsets], seed=block_q + block_kv
    )


@given(
    length_blocks=st.integers(1, 6),
    block=st.one_of(st.sampled_from([16, 32, 48, 64, 256]), st.integers(1, 80)),  # unpadded, padded
    cap=st.sampled_from([16, 32, 64, 128]),
)
def test_tiling_maps_positions_to_tiles(length_blocks, block, cap):
    # Every tile is a power of two >= 16 holding a real row, and the loop bounds count the tiles
    # wholly before a position (first_tile) or starting before it (end_tile).
    tiling = gpu_tiling.Tiling.make(length_blocks * block, block, cap, attention_triton.MIN_TILE)
    assert tiling.tile >= attention_triton.MIN_TILE and tiling.tile & (tiling.tile - 1) == 0
    assert tiling.padded % tiling.tile == 0 and 0 <= tiling.padded - block < attention_triton.MIN_TILE
    padded_index = np.arange(tiling.padded_length).reshape(-1, tiling.tile)
    position = padded_index // tiling.padded * block + padded_index % tiling.padded
    real = padded_index % tiling.padded < block
    assert real.any(1).all()

    @jax.jit
    def evaluate(tiles, bounds):
        def rows(i):
            first, count, mask = tiling.rows(i)
            return first, jnp.asarray(count), jnp.ones(tiling.tile, bool) if mask is None else mask

        return jax.vmap(rows)(tiles), jax.vmap(tiling.first_tile)(bounds), jax.vmap(tiling.end_tile)(bounds)

    bounds = np.arange(-3, tiling.length + 4, dtype=np.int32)
    (first, count, mask), first_tile, end_tile = evaluate(np.arange(tiling.num_tiles, dtype=np.int32), bounds)
    np.testing.assert_array_equal(first, position[:, 0])
    np.testing.assert_array_equal(count, real.sum(1))
    np.testing.assert_array_equal(mask, real)
    last_real = np.where(real, position, -1).max(1)
    np.testing.assert_array_equal(first_tile, (last_real[None] < bounds[:, None]).sum(1), err_msg="first_tile")
    np.testing.assert_array_equal(end_tile, (position[None, :, 0] < bounds[:, None]).sum(1), err_msg="end_tile")


def test_given_delta_replaces_out():
    q, k, v, d_out = random_qkv(7, 1, 32, 4, 4, 64)
    run = kernels(causal=True, window=None, scale=0.3, block_q=16, block_kv=16)  # CASES[0]'s kernels, already compiled
    out, lse, grads = run(q, k, v, d_out, None, None, jnp.int32(0), jnp.int32(0))
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out, out)
    bwd = functools.partial(
        attention_triton.attention_bwd, causal=True, scale=0.3, block_q=16, block_kv=16, interpret=True
    )
    with_delta = jax.jit(bwd, compiler_options=FAST_COMPILE)(q, k, v, None, lse, d_out, delta=delta)
    for a, b in zip(grads, with_delta):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_tiles_hidden_by_traced_offsets_are_skipped_not_masked():
    # NaN in every key/value tile that causality hides from all queries: a computed-then-masked
    # tile would spread it (0 * NaN), a skipped one cannot. Offsets are traced, as in a ring.
    T = S = 32
    q, k, v, d_out = random_qkv(5, 1, T, 4, 4, 64)
    run = kernels(causal=True, window=None, scale=0.3, block_q=16, block_kv=16)  # CASES[0]'s kernels, already compiled
    hidden = (np.arange(S) >= 16)[None, :, None, None]  # the second key tile
    k_nan, v_nan = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)
    for q_offset, kv_offset in ((0, 16), (4, 20)):  # queries end at 31 / 35, hidden keys start at 32 / 36
        out, lse, (dq, dk, dv) = run(q, k_nan, v_nan, d_out, None, None, jnp.int32(q_offset), jnp.int32(kv_offset))
        assert np.all(np.isfinite(np.asarray(out))), "a tile wholly above the diagonal was computed"
        assert np.all(np.isfinite(np.asarray(dq))), "the dq kernel computed a tile wholly above the diagonal"
        np.testing.assert_array_equal(np.asarray(dk)[:, 16:], 0.0, err_msg="the dk/dv kernel computed it")
        np.testing.assert_array_equal(np.asarray(dv)[:, 16:], 0.0)
        expected = oracle(q, k, v, d_out, causal=True, scale=0.3, q_offset=q_offset, kv_offset=kv_offset)
        assert_kernel_matches_oracle(out, lse, (dq, dk, dv), expected, jnp.float32)


def test_tiles_with_no_common_segment_are_skipped():
    T = 32
    q, k, v, d_out = random_qkv(6, 1, T, 2, 2, 64)
    ids = jnp.asarray(np.repeat(np.arange(4), 8)[None], jnp.int32)  # one document per block of 8
    v_nan = v.at[:, 8:16].set(jnp.nan)  # document 1's values; only document 1's queries may read them
    run = kernels(causal=False, window=6, scale=0.3, block_q=8, block_kv=8)  # CASES[-1]'s kernels, already compiled
    out, _, (dq, dk, _) = run(q, k, v_nan, d_out, ids, ids, jnp.int32(0), jnp.int32(0))
    others = np.r_[0:8, 16:32]
    for name, x in (("out", out), ("dq", dq)):
        x = np.asarray(x)
        assert np.all(np.isfinite(x[:, others])), f"{name}: a tile with no common segment was computed"
        assert np.all(np.isnan(x[:, 8:16])), f"{name}: document 1 must read its own values"
    assert np.all(np.isfinite(np.asarray(dk)[:, others])), "dk: a tile with no common segment was computed"


def test_inside_shard_map():
    # The ring calls the kernels per device with offsets derived from the device's position.
    # Interpret mode evaluates the kernel on values of mixed shard_map types, which the vma check
    # rejects, hence check_vma=False here; the compiled path lowers either way.
    mesh = Mesh(np.array(jax.devices()[:2]), ("sp",))
    q, k, v, d_out = random_qkv(8, 1, 32, 2, 1, 32)

    def local(impl, q, k, v, d_out):
        extra = dict(interpret=True) if impl is attention_triton else {}
        kw = dict(causal=True, scale=0.3, block_q=16, block_kv=16, q_offset=16 * jax.lax.axis_index("sp"), **extra)
        out, lse = impl.attention_fwd(q, k, v, **kw)
        return out, lse, *impl.attention_bwd(q, k, v, out, lse, d_out, **kw)

    spec = PartitionSpec(None, "sp")
    out_specs = (spec, PartitionSpec(None, None, "sp"), spec, spec, spec)
    results = [
        jax.jit(
            jax.shard_map(functools.partial(local, impl), mesh=mesh, in_specs=spec, out_specs=out_specs,
                          check_vma=impl is attention_xla),
            compiler_options=FAST_COMPILE,
        )(q, k, v, d_out)
        for impl in (attention_triton, attention_xla)
    ]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize(
    "T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype",
    [
        (256, 256, 8, 2, 128, 128, 128, True, None, True, jnp.bfloat16),
        (256, 128, 4, 1, 80, 256, 64, True, 100, False, jnp.bfloat16),
        (96, 48, 4, 4, 64, 24, 48, False, None, True, jnp.float32),
        (16, 16, 4, 2, 32, 8, 8, False, 5, False, jnp.float16),
    ],
)
def test_kernels_lower_to_triton_for_cuda(T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype):
    # Exporting for CUDA runs the Pallas -> Triton lowering (power-of-two shapes, supported
    # primitives) without a GPU; inside shard_map with the vma check on, as a ring runs them. The
    # abstract device names the GPU to lower for (newer jax asks; older falls back to sm_90).
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((2,), ("sp",), abstract_device=gpu)
    kw = dict(causal=causal, window=window, scale=0.125, block_q=block_q, block_kv=block_kv)

    def local(q, k, v, d_out, q_ids, kv_ids, kv_offset):
        q_offset = T * jax.lax.axis_index("sp")
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        out, lse = attention_triton.attention_fwd(q, k, v, **masking, **kw)
        return out, lse, *attention_triton.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)

    seq, rows = PartitionSpec(None, "sp"), PartitionSpec(None, None, "sp")
    ids_spec = seq if segments else None
    fn = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(seq, seq, seq, seq, ids_spec, ids_spec, PartitionSpec()),
        out_specs=(seq, rows, seq, seq, seq),
    ))
    q = jax.ShapeDtypeStruct((1, 2 * T, N, H), dtype)
    kv = jax.ShapeDtypeStruct((1, 2 * S, K, H), dtype)
    q_ids = jax.ShapeDtypeStruct((1, 2 * T), jnp.int32) if segments else None
    kv_ids = jax.ShapeDtypeStruct((1, 2 * S), jnp.int32) if segments else None
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)]
        )(q, kv, kv, q, q_ids, kv_ids, jax.ShapeDtypeStruct((), jnp.int32))
    module = exported.mlir_module()
    for name in ("ring_attn_fwd", "ring_attn_bwd_dq", "ring_attn_bwd_dkv"):
        assert f'name = "{name}"' in module, name
