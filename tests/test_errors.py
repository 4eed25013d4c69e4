"""Bad input raises ValueError at trace time, naming the argument, the expectation and the value."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv, ring_mesh
from jax.sharding import PartitionSpec as P

import ring_attn

q, k, v, _ = random_qkv(0, 2, 16, 4, 2, 32)
ids = jnp.zeros((2, 16), jnp.int32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=q[0]), r"q must have rank 4, \[B, T, N, H\], got shape \(16, 4, 32\)"),
        (dict(k=k[0], v=v[0]), r"k must have rank 4, \[B, S, K, H\], got shape"),
        (dict(k=random_qkv(1, 2, 16, 4, 3, 32)[1], v=random_qkv(1, 2, 16, 4, 3, 32)[2]),
         r"k has K=3 heads, which must divide q's N=4"),
        (dict(v=v[:, :8]), r"k \[B, S, K, H\] and v \[B, S, K, Hv\] must agree on B, S and K, "
                           r"got k \(2, 16, 2, 32\) and v \(2, 8, 2, 32\)"),
        # v's head dim may differ (MLA), its heads may not.
        (dict(v=v[:, :, :1, :16]), r"must agree on B, S and K, got k \(2, 16, 2, 32\) and v \(2, 16, 1, 16\)"),
        (dict(k=k[..., :16]), r"same head dim \(scores are q·k\), got q \(2, 16, 4, 32\) and k \(2, 16, 2, 16\)"),
        (dict(k=k[:1], v=v[:1]), r"same batch size, got q \(2, 16, 4, 32\) and k \(1, 16, 2, 32\)"),
        (dict(q=q.astype(jnp.int32)), r"q must have a floating dtype, got int32"),
        (dict(q=q.astype(jnp.bfloat16)), r"q, k and v must share one dtype, got bfloat16, float32 and float32"),
        (dict(segment_ids=ids[:, :8]), r"segment_ids must have shape \[B, T\] = \(2, 16\), got \(2, 8\)"),
        (dict(segment_ids=ids.astype(jnp.float32)), r"segment_ids must have an integer dtype, got float32"),
        (dict(segment_ids=(ids, ids[:, :4])), r"kv_segment_ids must have shape \[B, S\] = \(2, 16\), got \(2, 4\)"),
        (dict(layout="spiral"), r"unknown layout='spiral'; expected one of \('contiguous', 'zigzag'\)"),
        (dict(impl="cuda"),
         r"unknown impl='cuda'; expected one of "
         r"\('auto', 'pallas', 'pallas_triton', 'pallas_mgpu', 'pallas_tpu', 'xla'\)"),
        (dict(block_sizes=ring_attn.BlockSizes(block_q=6, block_kv=8)), r"T=16 .* must be divisible by block_q=6"),
        (dict(block_sizes=ring_attn.BlockSizes(block_q=8, block_kv=16), layout="zigzag"),
         r"S=8 .* must be divisible by block_kv=16"),
        (dict(block_sizes={"block_q": 8}), r"block_sizes must be a ring_attn.BlockSizes or None"),
        (dict(axis_name="sp"), r"axis_name='sp' is not bound: call ring_attention inside jax.shard_map"),
        (dict(scale="big"), r"scale must be a finite Python number or None, got 'big'"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(q=q, k=k, v=v)
    args.update({name: kwargs.pop(name) for name in ("q", "k", "v") if name in kwargs})
    with pytest.raises(ValueError, match=match):
        ring_attn.ring_attention(args["q"], args["k"], args["v"], **kwargs)


def test_zigzag_needs_even_local_length():
    q3, k3, v3, _ = random_qkv(2, 1, 3, 4, 4, 32)
    with pytest.raises(ValueError, match=r"layout='zigzag' .* must be even, got T=3 and S=3 "
                                         r"\(ring_attention_global pads"):
        ring_attn.ring_attention(q3, k3, v3, layout="zigzag")


def test_causal_ring_needs_equal_lengths():
    qs, ks, vs, _ = random_qkv(3, 1, 8, 4, 4, 32, S=16)
    seq = P(None, "sp")
    fn = jax.shard_map(
        functools.partial(ring_attn.ring_attention, axis_name="sp", causal=True),
        mesh=ring_mesh(2), in_specs=(seq, seq, seq), out_specs=seq,
    )
    with pytest.raises(ValueError, match=r"causal ring attention needs equal local query and key lengths, "
                                         r"got T=4 and S=8"):
        fn(qs, ks, vs)


@pytest.mark.parametrize("field,value", [("block_q", 0), ("block_kv", -8), ("block_q_dkv", 2.5), ("block_kv", True)])
def test_block_sizes_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"BlockSizes.{field} must be a positive int, got {value!r}"):
        ring_attn.BlockSizes(**{field: value})


def test_global_api_checks_the_mesh_axis():
    mesh = ring_mesh(4)
    with pytest.raises(ValueError, match=r"axis_name='ring' is not an axis of the mesh, whose axes are \('sp',\)"):
        ring_attn.ring_attention_global(q, k, v, mesh=mesh, axis_name="ring")
    with pytest.raises(ValueError, match=r"its length 20 must be divisible by 8"):
        ring_attn.zigzag(jnp.zeros((1, 20)), 4)


def test_global_api_checks_the_batch_axes():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "sp"))
    with pytest.raises(ValueError, match=r"batch_axes=\('sp',\) must name axes of the mesh .* other than"):
        ring_attn.ring_attention_global(q, k, v, mesh=mesh, axis_name="sp", batch_axes=("sp",))
    with pytest.raises(ValueError, match=r"batch_axes=\('model',\) must name axes of the mesh"):
        ring_attn.ring_attention_global(q, k, v, mesh=mesh, axis_name="sp", batch_axes=("model",))
    with pytest.raises(ValueError, match=r"the batch B=2 must be divisible by the 4 devices of batch_axes=\('data',\)"):
        ring_attn.ring_attention_global(q, k, v, mesh=mesh, axis_name="sp", batch_axes=("data",))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chunk_size=5), r"chunk_size must be a positive int dividing the token count L=16, got 5"),
        (dict(w_down=jnp.ones((8, 12))),
         r"w_down must have shape \(24, 8\) for x with D=8 and w_gate with F=24, got \(8, 12\)"),
        (dict(x=jnp.ones((16, 8))), r"x must have rank 3, got shape \(16, 8\)"),
    ],
)
def test_feedforward_bad_input(kwargs, match):
    args = dict(x=jnp.ones((2, 16, 8)), w_gate=jnp.ones((8, 24)), w_up=jnp.ones((8, 24)), w_down=jnp.ones((24, 8)))
    chunk = kwargs.pop("chunk_size", None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ring_attn.blockwise_feedforward(**args, chunk_size=chunk)
