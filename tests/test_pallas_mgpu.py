"""What is particular to the Mosaic GPU (Hopper) attention kernels, pallas_kernels.attention_mgpu:
gradients through ring_attention, the errors it raises, how it is chosen, and its lowering for
CUDA (which needs no GPU). The kernel contract itself is checked in test_kernel_contract.py."""

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import (
    FAST_COMPILE,
    abstract_mesh,
    assert_matches_oracle,
    exported_module,
    random_qkv,
    random_segments,
    ring_mesh,
)
from jax.sharding import PartitionSpec

import ring_attn
from pallas_kernels import attention_mgpu, backend

SCALE = 0.3
pytestmark = pytest.mark.usefixtures("mgpu_threads_compiled_once")


def test_gradients_through_ring_attention():
    # The Mosaic GPU forward, then the Triton backward (interpreted), on one device.
    B, T, N, K, H = 1, 128, 2, 1, 64
    q, k, v, d_out = random_qkv(12, B, T, N, K, H, dtype=jnp.bfloat16)
    ids = random_segments(13, B, T, 3)
    fn = functools.partial(
        ring_attn.ring_attention, causal=True, segment_ids=ids, impl="pallas_mgpu",
        block_sizes=ring_attn.BlockSizes(64, 64),
    )
    assert_matches_oracle(fn, q, k, v, d_out, compiler_options=FAST_COMPILE, causal=True, q_segment_ids=ids,
                          kv_segment_ids=ids)


def test_a_ring_says_what_to_do():
    # Interpret mode in this JAX keeps one global simulated GPU state and checks it across
    # devices, so concurrent kernels on a ring's devices trip over each other's barriers.
    q, k, v, _ = random_qkv(14, 1, 64, 2, 1, 64, dtype=jnp.bfloat16)
    fn = functools.partial(
        ring_attn.ring_attention_global, mesh=ring_mesh(4), axis_name="sp", causal=True, impl="pallas_mgpu",
        check_vma=False,
    )
    with pytest.raises(NotImplementedError, match="simulates one device at a time and cannot run a ring of 4"):
        jax.jit(fn)(q, k, v)


def test_float32_is_refused_by_name():
    q, k, v, _ = random_qkv(15, 1, 64, 2, 1, 64)
    with pytest.raises(ValueError, match=r"bfloat16 or float16 q, k and v .* got q.dtype=float32"):
        attention_mgpu.attention_fwd(q, k, v, scale=SCALE, block_q=64, block_kv=64, interpret=True)


def test_only_chosen_by_name():
    assert backend.resolve_impl("pallas_mgpu") == backend.Kernel.MGPU_INTERPRET  # CPU
    for impl in ("auto", "pallas"):
        assert backend.resolve_impl(impl) not in (backend.Kernel.MGPU, backend.Kernel.MGPU_INTERPRET)


@pytest.mark.parametrize(
    "T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,logit_soft_cap",
    [
        (256, 256, 8, 2, 128, 128, 128, True, None, True, jnp.bfloat16, None),
        (192, 96, 4, 4, 80, 96, 48, False, 40, False, jnp.float16, 30.0),
        (128, 128, 4, 1, 64, 128, 128, True, None, False, jnp.bfloat16, None),
    ],
)
def test_kernel_lowers_for_cuda(T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, logit_soft_cap):
    # Exporting for CUDA runs the Pallas -> Mosaic GPU lowering (register layouts, wgmma and TMA
    # shapes, barriers) without a GPU; inside shard_map with the vma check on, as a ring runs it.
    mesh = abstract_mesh((2,), ("sp",), "cuda")
    kw = dict(causal=causal, window=window, scale=0.125, logit_soft_cap=logit_soft_cap, block_q=block_q,
              block_kv=block_kv)

    def local(q, k, v, q_ids, kv_ids, kv_offset):
        q_offset = T * jax.lax.axis_index("sp")
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        return attention_mgpu.attention_fwd(q, k, v, **masking, **kw)

    seq, rows = PartitionSpec(None, "sp"), PartitionSpec(None, None, "sp")
    ids_spec = seq if segments else None
    in_specs = (seq, seq, seq, ids_spec, ids_spec, PartitionSpec())
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(seq, rows)))
    q, kv = ((1, 2 * T, N, H), dtype), ((1, 2 * S, K, H), dtype)
    q_ids, kv_ids = (((1, 2 * T), jnp.int32), ((1, 2 * S), jnp.int32)) if segments else (None, None)
    module = exported_module(fn, mesh, "cuda", (q, kv, kv, q_ids, kv_ids, ((), jnp.int32)), in_specs)
    assert "stablehlo.custom_call @mosaic_gpu" in module
    assert "wgmma" in module and "cp.async.bulk.tensor" in module  # the kernel really uses wgmma and TMA
