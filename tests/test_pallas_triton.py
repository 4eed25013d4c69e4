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
from conftest import (
    FAST_COMPILE,
    abstract_mesh,
    exported_module,
    random_qkv,
)
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import attention_triton, attention_xla, gpu_tiling


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
    "T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,logit_soft_cap",
    [
        (256, 256, 8, 2, 128, 128, 128, True, None, True, jnp.bfloat16, None),
        (256, 128, 4, 1, 80, 256, 64, True, 100, False, jnp.bfloat16, 30.0),
        (96, 48, 4, 4, 64, 24, 48, False, None, True, jnp.float32, None),
        (16, 16, 4, 2, 32, 8, 8, False, 5, False, jnp.float16, None),
    ],
)
def test_kernels_lower_to_triton_for_cuda(
    T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, logit_soft_cap
):
    # Exporting for CUDA runs the Pallas -> Triton lowering (power-of-two shapes, supported
    # primitives) without a GPU; inside shard_map with the vma check on, as a ring runs them. The
    # abstract device names the GPU to lower for (newer jax asks; older falls back to sm_90).
    mesh = abstract_mesh((2,), ("sp",), "cuda")
    kw = dict(causal=causal, window=window, scale=0.125, logit_soft_cap=logit_soft_cap, block_q=block_q,
              block_kv=block_kv)

    def local(q, k, v, d_out, q_ids, kv_ids, kv_offset):
        q_offset = T * jax.lax.axis_index("sp")
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        out, lse = attention_triton.attention_fwd(q, k, v, **masking, **kw)
        return out, lse, *attention_triton.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)

    seq, rows = PartitionSpec(None, "sp"), PartitionSpec(None, None, "sp")
    ids_spec = seq if segments else None
    in_specs = (seq, seq, seq, seq, ids_spec, ids_spec, PartitionSpec())
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(seq, rows, seq, seq, seq)))
    q, kv = ((1, 2 * T, N, H), dtype), ((1, 2 * S, K, H), dtype)
    q_ids, kv_ids = (((1, 2 * T), jnp.int32), ((1, 2 * S), jnp.int32)) if segments else (None, None)
    module = exported_module(fn, mesh, "cuda", (q, kv, kv, q, q_ids, kv_ids, ((), jnp.int32)), in_specs)
    for name in ("ring_attn_fwd", "ring_attn_bwd_dq", "ring_attn_bwd_dkv"):
        assert f'name = "{name}"' in module, name
