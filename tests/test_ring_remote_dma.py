"""The remote-DMA TPU ring (ring_attn.ring_remote_dma) in TPU interpret mode on simulated CPU
devices: the same answers as the ppermute ring with the same kernels and as the float64 oracle.

Interpret mode runs every grid step of every device through Python, so shapes are tiny: one
batch row, 16 positions per device, 2 query heads over 1 key/value head (GQA 2:1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, assert_close, oracle, output_and_grads, random_qkv, random_segments, ring_mesh
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

import ring_attn
from pallas_kernels import attention_tpu
from ring_attn.ring_remote_dma import ring_attention_remote_dma

SEQ = P(None, "sp")


def sharded(attention, ring_size, *, check_vma, **kwargs):
    """attention(q, k, v, segment_ids=..., sinks=...) as a function of global arrays, sequence over
    "sp", sinks replicated."""
    return jax.shard_map(
        lambda q, k, v, q_ids, kv_ids, sinks: attention(
            q, k, v, axis_name="sp", segment_ids=(q_ids, kv_ids), sinks=sinks, **kwargs
        ),
        mesh=ring_mesh(ring_size), in_specs=(SEQ,) * 5 + (P(),), out_specs=SEQ, check_vma=check_vma,
    )


def check_ring(ring_size, *, causal, seed, gradients, block=16, N=2, K=1, H=32, Hv=None, logit_soft_cap=None,
               sinks=False):
    B, T = 1, 16
    L = T * ring_size
    q, k, v, d_out = random_qkv(seed, B, L, N, K, H, Hv=Hv)
    q_ids = random_segments(seed + 1, B, L, 3)
    kv_ids = q_ids if causal else random_segments(seed + 2, B, L, 3)  # cross ids when not causal
    sinks = jnp.asarray(np.random.default_rng(seed + 3).normal(0.5, 1.0, N), jnp.float32) if sinks else None
    kwargs = dict(causal=causal, block_sizes=ring_attn.BlockSizes(block, block), logit_soft_cap=logit_soft_cap)
    remote = sharded(ring_attention_remote_dma, ring_size, check_vma=False, **kwargs)
    ppermute = sharded(
        functools.partial(ring_attn.ring_attention, impl="pallas_tpu"), ring_size, check_vma=False, **kwargs
    )

    masking = dict(causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids, logit_soft_cap=logit_soft_cap)
    expected, expected_grads = oracle(q, k, v, d_out, sinks=sinks, **masking)
    if gradients:
        fn = lambda q, k, v, *sinks: remote(q, k, v, q_ids, kv_ids, *(sinks or (None,)))  # noqa: E731
        out, grads = output_and_grads(fn, q, k, v, d_out, FAST_COMPILE, sinks=sinks)
        assert len(grads) == len(expected_grads)
        for name, g, e in zip(("dq", "dk", "dv", "dsinks"), grads, expected_grads):
            assert_close(g, e, kind="gradient", name=name)
    else:
        out = jax.jit(remote, compiler_options=FAST_COMPILE)(q, k, v, q_ids, kv_ids, sinks)
    assert_close(out, expected, name="out")
    # The same kernel body over the same shards, merged in the same order: equal up to rounding.
    ppermute_out = jax.jit(ppermute, compiler_options=FAST_COMPILE)(q, k, v, q_ids, kv_ids, sinks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ppermute_out), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_causal_ring_of_4_with_segments_soft_cap_and_sinks_matches_oracle_and_ppermute_ring():
    check_ring(4, causal=True, seed=0, gradients=True, logit_soft_cap=2.0, sinks=True)


@pytest.mark.slow
def test_ring_of_8_with_cross_segments_matches_oracle_and_ppermute_ring():
    check_ring(8, causal=False, seed=10, gradients=False)


@pytest.mark.slow
@pytest.mark.parametrize(("H", "Hv", "causal"), [(64, 32, True), (32, 64, False)])
def test_mla_head_dims_match_oracle_and_ppermute_ring(H, Hv, causal):
    # k and v shards of different widths travel in buffers of their own.
    check_ring(4, causal=causal, seed=11 + H, gradients=True, H=H, Hv=Hv, logit_soft_cap=2.0 if causal else None,
               sinks=causal)


@pytest.mark.parametrize("Hv", [32, 16], ids=["v_as_wide", "v_narrower"])
def test_ring_step_kernel_passes_kv_to_the_next_device_without_races(capfd, Hv):
    """One ring step under shard_map's defaults (check_vma=True), with eager DMAs and the race
    detector: the kernel returns the shard of the previous device and the partial of
    `attention_fwd`, no access races a DMA, and every semaphore is back at 0 at kernel exit (each
    device signalled once and waited once, every copy awaited on both ends); the interpreter
    prints what it finds. With v narrower than k (MLA), each travels in a buffer of its own width."""
    ring_size, B, T, N, K, H = 4, 1, 16, 2, 1, 32
    q, k, v, _ = random_qkv(20, B, T * ring_size, N, K, H, Hv=Hv)
    ids = random_segments(21, B, T * ring_size, 3)
    params = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)
    kw = dict(causal=False, scale=0.25, block_q=16, block_kv=16, interpret=params)

    def step(q, k, v, ids):
        masking = dict(q_segment_ids=ids, kv_segment_ids=ids)
        (out, lse), kv_next = attention_tpu.attention_fwd_ring_step(q, k, v, axis_name="sp", **masking, **kw)
        expected_out, expected_lse = attention_tpu.attention_fwd(q, k, v, **masking, **kw)
        return out - expected_out, lse - expected_lse, *kv_next

    stats = P(None, None, "sp")
    out_diff, lse_diff, k_next, v_next, ids_next = jax.jit(
        jax.shard_map(step, mesh=ring_mesh(ring_size), in_specs=(SEQ,) * 4,
                      out_specs=(SEQ, stats, SEQ, SEQ, SEQ)),
        compiler_options=FAST_COMPILE,
    )(q, k, v, ids)

    np.testing.assert_array_equal(np.asarray(out_diff), 0.0)
    np.testing.assert_array_equal(np.nan_to_num(np.asarray(lse_diff)), 0.0)
    for name, got, sent in (("k", k_next, k), ("v", v_next, v), ("segment ids", ids_next, ids)):
        np.testing.assert_array_equal(np.asarray(got), np.roll(np.asarray(sent), T, axis=1), err_msg=name)
    printed = capfd.readouterr().out
    assert "RACE DETECTED" not in printed and "non-zero count" not in printed, printed


@pytest.mark.parametrize("dtype,causal,segments", [(jnp.bfloat16, True, True), (jnp.float32, False, False)])
def test_lowers_to_mosaic_for_tpu(dtype, causal, segments):
    # Cross-lowering for TPU on this CPU, under shard_map's defaults: the remote copies, the
    # barrier semaphore and the ring's typing (check_vma=True) all lower through Mosaic.
    ring_size, B, T, N, K, H = 4, 2, 256, 8, 2, 80
    q = jax.ShapeDtypeStruct((B, T * ring_size, N, H), dtype)
    k = jax.ShapeDtypeStruct((B, T * ring_size, K, H), dtype)
    ids = jax.ShapeDtypeStruct((B, T * ring_size), jnp.int32) if segments else None
    attention = functools.partial(
        ring_attention_remote_dma, axis_name="sp", causal=causal, block_sizes=ring_attn.BlockSizes(128, 128),
        interpret=False,
    )

    def fwd_bwd(q, k, v, ids, d_out):
        ring = jax.shard_map(
            lambda q, k, v, ids: attention(q, k, v, segment_ids=ids),
            mesh=ring_mesh(ring_size), in_specs=(SEQ,) * 3 + (None if ids is None else SEQ,), out_specs=SEQ,
        )
        out, vjp = jax.vjp(lambda q, k, v: ring(q, k, v, ids), q, k, v)
        return out, vjp(d_out)

    module = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, k, k, ids, q).mlir_module()
    for name in ("ring_attn_tpu_fwd_ring_step", "ring_attn_tpu_fwd", "ring_attn_tpu_bwd_dkv"):
        assert name in module


q_, k_, v_, _ = random_qkv(30, 1, 32, 2, 1, 32)  # global arrays: 16 positions on each of 2 devices


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(layout="zigzag"), NotImplementedError, r"supports layout='contiguous' only, got layout='zigzag'"),
        (dict(layout="spiral"), ValueError, r"unknown layout='spiral'"),
        (dict(window=8), NotImplementedError, r"no sliding window, got window=8"),
        (dict(interpret=True), ValueError, r"interpret must be None .* got True"),
        (dict(block_sizes=ring_attn.BlockSizes(6, 8)), ValueError, r"T=16 .* divisible by block_q=6"),
        (dict(k=k_[:, :16], v=v_[:, :16], causal=True), ValueError,
         r"equal local query and key lengths, got T=16 and S=8"),
        (dict(scale=float("nan")), ValueError, r"scale must be a finite Python number or None, got nan"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    kwargs = dict(kwargs)
    arrays = [kwargs.pop(name, default) for name, default in (("q", q_), ("k", k_), ("v", v_))]
    attention = functools.partial(ring_attention_remote_dma, axis_name="sp", **kwargs)
    with pytest.raises(error, match=match):
        jax.shard_map(attention, mesh=ring_mesh(2), in_specs=(SEQ,) * 3, out_specs=SEQ, check_vma=False)(*arrays)
