"""The Mosaic GPU (Hopper) attention backward, pallas_kernels.attention_mgpu_bwd, run in Mosaic GPU
interpret mode on the CPU against the float64 oracle; and lowered for CUDA, which needs no GPU.

The kernels get the oracle's out and lse, so that they are tested apart from the forward. Shapes
are tiny (interpret mode is slow) and each compiled kernel is reused for several traced offsets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FAST_COMPILE,
    abstract_mesh,
    assert_gradients_match,
    exported_module,
    kernel_oracle,
    random_qkv,
    random_segments,
)
from jax.sharding import PartitionSpec

from pallas_kernels import attention_mgpu_bwd

SCALE = 0.3
pytestmark = pytest.mark.usefixtures("mgpu_threads_compiled_once")


@functools.cache
def backward(*, causal, window, block_q, block_kv):
    """The jitted interpreted backward; offsets, segment ids and delta are traced arguments."""
    kw = dict(causal=causal, window=window, scale=SCALE, block_q=block_q, block_kv=block_kv, interpret=True)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v, out, lse, d_out, delta, q_ids, kv_ids, q_offset, kv_offset):
        return attention_mgpu_bwd.attention_bwd(
            q, k, v, out, lse, d_out, delta=delta, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
            q_offset=q_offset, kv_offset=kv_offset, **kw,
        )

    return run


def check_backward(q, k, v, d_out, *, k_run=None, v_run=None, delta_given=False, q_ids=None, kv_ids=None,
                   q_offset, kv_offset, causal, window, block_q, block_kv):
    """The kernels' (dq, dk, dv), given the oracle's out and lse, against the oracle's gradients
    (`assert_gradients_match`: exactly 0 where nothing is visible). k_run / v_run: what the
    kernels get instead of k / v. Returns the visible pairs."""
    out, lse, expected, visible = kernel_oracle(
        q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, causal=causal, window=window, scale=SCALE
    )
    out, lse = jnp.asarray(out, jnp.float32), jnp.asarray(lse, jnp.float32)
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out) if delta_given else None
    run = backward(causal=causal, window=window, block_q=block_q, block_kv=block_kv)
    grads = run(
        q, k if k_run is None else k_run, v if v_run is None else v_run, None if delta_given else out, lse, d_out,
        delta, q_ids, kv_ids, jnp.int32(q_offset), jnp.int32(kv_offset),
    )
    assert [g.shape for g in grads] == [g.shape for g in expected]
    assert_gradients_match(grads, expected, visible, dtype=q.dtype)
    return visible


CASES = [
    # (B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, [(q_offset, kv_offset), ...])
    # GQA 4:1, head dim 128 (one consumer warpgroup, key tiles of 64), segments, causal. Offsets:
    # on the diagonal; keys shifted by 100, so that query rows 0..99 (a whole tile and more) see no
    # key and no query sees key tile 1; both shifted; keys wholly in the future (every gradient 0).
    (1, 128, 128, 4, 1, 128, 128, 128, True, None, True, jnp.bfloat16, [(0, 0), (0, 100), (40, 100), (0, 200)]),
    # MHA, head dim 64 (two consumer warpgroups), bidirectional, batch 2, blocks of 48 (padded to 64 rows).
    (2, 96, 96, 2, 2, 64, 48, 48, False, None, False, jnp.bfloat16, [(5, 0)]),
    # float16, head dim 80 (padded to 128), GQA 2:1, a causal sliding window; delta given, no out.
    (1, 64, 128, 2, 1, 80, 64, 64, True, 24, False, jnp.float16, [(64, 0)]),
]


@pytest.mark.slow
@pytest.mark.parametrize("B,T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,offsets", CASES)
def test_backward_matches_oracle(B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, offsets):
    q, k, v, d_out = random_qkv(T * S + H, B, T, N, K, H, S=S, dtype=dtype)
    # Documents over global positions, as a ring sees them: each side's ids are its slice.
    ids = random_segments(T, B, 384, 6) if segments else None
    for q_offset, kv_offset in offsets:  # one compiled kernel for every offset
        q_ids = ids[:, q_offset : q_offset + T] if segments else None
        kv_ids = ids[:, kv_offset : kv_offset + S] if segments else None
        check_backward(
            q, k, v, d_out, delta_given=dtype == jnp.float16, q_ids=q_ids, kv_ids=kv_ids, q_offset=q_offset,
            kv_offset=kv_offset, causal=causal, window=window, block_q=block_q, block_kv=block_kv,
        )


def test_hidden_tiles_are_skipped_not_masked():
    # NaN in key/value tiles that no query may see, by causality (keys 256..383 at both offsets,
    # 128..255 too at (0, 0)) or by segment (keys 128..255 hold a document no query belongs to):
    # a tile computed and then masked would spread the NaN (0 * NaN), a skipped one cannot. Head
    # dim 64: the dq kernel streams key tiles of 128, the dk/dv kernel owns key tiles of 64.
    B, T, S, N, K, H = 1, 128, 384, 2, 1, 64
    q, k, v, d_out = random_qkv(11, B, T, N, K, H, S=S, dtype=jnp.bfloat16)
    q_ids = jnp.zeros((B, T), jnp.int32)
    kv_ids = jnp.asarray((np.arange(S) // 128 == 1)[None], jnp.int32)
    hidden = (np.arange(S) >= 128)[None, :, None, None]
    k_nan, v_nan = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)
    for q_offset in (0, 128):
        seen = check_backward(
            q, k, v, d_out, k_run=k_nan, v_run=v_nan, q_ids=q_ids, kv_ids=kv_ids, q_offset=q_offset, kv_offset=0,
            causal=True, window=None, block_q=128, block_kv=128,
        )
        assert not seen[:, :, 128:].any()


def test_float32_is_refused_by_name():
    q, k, v, d_out = random_qkv(15, 1, 64, 2, 1, 64)
    lse = jnp.zeros((1, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"bfloat16 or float16 q, k and v .* got q.dtype=float32"):
        attention_mgpu_bwd.attention_bwd(q, k, v, q, lse, d_out, scale=SCALE, block_q=64, block_kv=64, interpret=True)


def test_head_dim_above_256_is_refused():
    # wgmma's widest N is 256; MLA's 192 fits (tests/test_kernel_contract.py), 320 does not.
    q, k, v, d_out = random_qkv(16, 1, 64, 2, 1, 320, dtype=jnp.bfloat16, Hv=128)
    lse = jnp.asarray(np.random.default_rng(16).standard_normal((1, 2, 64)), jnp.float32)
    with pytest.raises(ValueError, match=r"head dims up to 256, got q/k 320, v 128"):
        attention_mgpu_bwd.attention_bwd(q, k, v, None, lse, d_out, scale=SCALE, block_q=64, block_kv=64,
                                         delta=lse, interpret=True)


@pytest.mark.parametrize(
    "T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,logit_soft_cap",
    [
        (256, 256, 8, 2, 128, 128, 128, True, None, True, jnp.bfloat16, None),
        (192, 96, 4, 4, 80, 96, 48, False, 40, False, jnp.float16, 30.0),
        (128, 128, 4, 1, 64, 128, 128, True, None, True, jnp.bfloat16, None),
    ],
)
def test_kernel_lowers_for_cuda(T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, logit_soft_cap):
    # Exporting for CUDA runs the Pallas -> Mosaic GPU lowering (register layouts, wgmma and TMA
    # shapes, barriers) without a GPU; inside shard_map with the vma check on, as a ring runs it.
    mesh = abstract_mesh((2,), ("sp",), "cuda")
    kw = dict(causal=causal, window=window, scale=0.125, logit_soft_cap=logit_soft_cap, block_q=block_q,
              block_kv=block_kv)

    def local(q, k, v, out, lse, d_out, q_ids, kv_ids, kv_offset):
        q_offset = T * jax.lax.axis_index("sp")
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        return attention_mgpu_bwd.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)

    seq, rows = PartitionSpec(None, "sp"), PartitionSpec(None, None, "sp")
    ids_spec = seq if segments else None
    in_specs = (seq, seq, seq, seq, rows, seq, ids_spec, ids_spec, PartitionSpec())
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(seq, seq, seq)))
    q, kv = ((1, 2 * T, N, H), dtype), ((1, 2 * S, K, H), dtype)
    out, lse = ((1, 2 * T, N, H), jnp.float32), ((1, N, 2 * T), jnp.float32)
    q_ids, kv_ids = (((1, 2 * T), jnp.int32), ((1, 2 * S), jnp.int32)) if segments else (None, None)
    args = (q, kv, kv, out, lse, q, q_ids, kv_ids, ((), jnp.int32))
    module = exported_module(fn, mesh, "cuda", args, in_specs)
    assert module.count("stablehlo.custom_call @mosaic_gpu") == 2  # the dq kernel and the dk/dv kernel
    assert "wgmma" in module and "cp.async.bulk.tensor" in module  # the kernels really use wgmma and TMA
