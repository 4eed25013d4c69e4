"""The per-shard kernel contract, one suite for every kernel family, against the float64 oracle.

Each backend runs through `pallas_kernels.attention_fwd` / `attention_bwd` with a resolved
`Kernel`: jnp ("xla"), Pallas Triton and Pallas TPU in their interpret modes, Mosaic GPU in its
interpret mode. Capabilities decide what a backend is asked: Mosaic GPU takes 16-bit inputs only
and computes 64-row tiles, so its cases are bfloat16/float16 ones of that shape. A new masking
or score option is added to CASES once and checked on every backend. Logit soft-capping is inside
every kernel; sinks fold into any kernel's (out, lse) (`pallas_kernels.fold_sinks`), and are
checked here through each family's backward with the folded statistics.

Every output element is written on every path: the Triton and Mosaic GPU interpreters fill fresh
outputs with NaN (`test_interpreters_poison_fresh_outputs` proves it), so a missed write fails the
finiteness check of `assert_close`; the TPU interpreter, as the hardware, carries the previous grid
step's output block over, so a missed write there shows as another tile's values, which the oracle
comparison rejects.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, assert_kernel_matches_oracle, kernel_oracle, random_qkv, random_segments

import pallas_kernels
from pallas_kernels import Kernel, attention_mgpu

SCALE = 0.3
pytestmark = pytest.mark.usefixtures("mgpu_threads_compiled_once")


@dataclasses.dataclass(frozen=True)
class Backend:
    kernel: Kernel
    sixteen_bit_only: bool = False  # wgmma operands: bfloat16 / float16

    def __str__(self):
        return self.kernel.value


XLA = Backend(Kernel.XLA)
TRITON = Backend(Kernel.TRITON_INTERPRET)
TPU = Backend(Kernel.TPU_INTERPRET)
MGPU = Backend(Kernel.MGPU_INTERPRET, sixteen_bit_only=True)
BACKENDS = (XLA, TRITON, TPU, MGPU)

CASES = [
    # (B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, logit_soft_cap, sinks,
    #  [(q_offset, kv_offset), ...])
    # MHA on the diagonal, soft-capped, with sinks; then shifted so that a whole tile is hidden and
    # rows 0..6 see no key (with sinks: out 0, lse the sink).
    (1, 32, 32, 4, 4, 64, 16, 16, True, None, False, jnp.float32, 2.0, True, [(0, 0), (5, 12)]),
    # GQA 8:2, head dim 80 (padded on the GPU), segments, key blocks of 8, sinks; offsets that hide
    # whole tiles, and one where every query sees at most one key (dq, dk zero by cancellation only).
    (1, 16, 32, 8, 2, 80, 16, 8, True, None, True, jnp.float32, None, True, [(20, 16), (40, 16), (16, 16)]),
    # MQA 4:1, head dim 128, query blocks of 8, soft-capped: keys wholly in the future (nothing
    # visible), then wholly in the past.
    (1, 16, 32, 4, 1, 128, 8, 16, True, None, False, jnp.float32, 5.0, False, [(0, 32), (31, 0)]),
    # Bidirectional with segments, GQA 4:2, head dim 32, batch 2, T != S, blocks of 12 and 24;
    # a tight cap (most scores saturate) and sinks.
    (2, 24, 48, 4, 2, 32, 12, 24, False, None, True, jnp.float32, 1.5, True, [(0, 0)]),
    # bfloat16 inputs, float32 accumulation, soft-capped, sinks.
    (1, 32, 32, 4, 2, 64, 16, 16, True, None, False, jnp.bfloat16, 3.0, True, [(0, 0), (16, 8)]),
    # A causal sliding window: tiles skipped on both sides.
    (1, 64, 64, 2, 1, 32, 16, 16, True, 10, False, jnp.float32, None, False, [(0, 0), (40, 0)]),
    # A bidirectional window with segments, soft-capped.
    (1, 32, 32, 2, 2, 64, 8, 8, False, 6, True, jnp.float32, 2.0, False, [(3, 0)]),
    # MLA: values of their own width, H given as (q/k, v). DeepSeek's 192/128 with GQA 4:2,
    # segments, soft-cap and sinks, on the diagonal and shifted.
    (1, 32, 32, 4, 2, (192, 128), 16, 16, True, None, True, jnp.float32, 2.0, True, [(0, 0), (5, 12)]),
    # 192/128 at blocks of 64: Triton's backward takes 32-row query tiles past a q/k dim of 128.
    (1, 64, 64, 2, 1, (192, 128), 64, 64, True, None, False, jnp.float32, None, False, [(0, 0)]),
    # 96/64 in bfloat16 under a bidirectional window; 64/32 causal, T != S; values wider than keys.
    (1, 16, 32, 4, 4, (96, 64), 8, 16, False, 6, False, jnp.bfloat16, None, False, [(3, 0)]),
    (1, 16, 32, 2, 1, (64, 32), 8, 8, True, None, False, jnp.float32, None, True, [(20, 8)]),
    (2, 16, 16, 2, 2, (32, 64), 8, 8, True, None, True, jnp.float32, 3.0, False, [(0, 0)]),
]

# Mosaic GPU: 16-bit, tiles of 64 query rows. Interpret mode is slow: few, small cases.
MGPU_CASES = [
    # GQA 4:1, head dim 128 (key tiles of 64), segments, causal, soft-capped, sinks: on the
    # diagonal; shifted so that rows 40..99 see no key; keys wholly in the future.
    (1, 128, 256, 4, 1, 128, 128, 128, True, None, True, jnp.bfloat16, 2.0, True, [(0, 0), (40, 100), (0, 200)]),
    # MHA, head dim 64, bidirectional, batch 2, blocks of 48 (padded to 64 rows).
    (2, 96, 96, 4, 4, 64, 48, 48, False, None, False, jnp.bfloat16, None, False, [(5, 0)]),
    # float16, head dim 80 (padded to 128), GQA 2:1, a causal sliding window, sinks.
    (1, 64, 128, 2, 1, 80, 64, 64, True, 24, False, jnp.float16, None, True, [(64, 0)]),
    # MLA 192/128, GQA 4:2, causal, soft-capped, sinks.
    (1, 64, 128, 4, 2, (192, 128), 64, 64, True, None, False, jnp.bfloat16, 2.0, True, [(64, 0)]),
]


def backend_cases():
    for backend in BACKENDS:
        for case in MGPU_CASES if backend.sixteen_bit_only else CASES:
            B, T, S, _, _, H, *_, dtype, cap, sinks, _ = case
            extras = "".join(["-cap" if cap else "", "-sinks" if sinks else ""])
            heads = "x".join(map(str, H)) if isinstance(H, tuple) else H
            yield pytest.param(backend, *case, id=f"{backend}-{B}x{T}x{S}-{heads}-{dtype.__name__}{extras}")


@functools.cache
def kernels(kernel, *, causal, window, block_q, block_kv, given_delta, logit_soft_cap=None):
    """Jitted forward + backward of one kernel; offsets, segment ids and sinks are traced arguments,
    so one compiled kernel serves every offset. `given_delta`: the backward gets `delta` and no
    `out`. With `sinks` they are folded into the forward's (out, lse), which the backward is given,
    and their gradient is a fourth."""
    kw = dict(impl=kernel, causal=causal, window=window, scale=SCALE, logit_soft_cap=logit_soft_cap,
              block_q=block_q, block_kv=block_kv)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, sinks=None):
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        out, lse = pallas_kernels.attention_fwd(q, k, v, **masking, **kw)
        if sinks is not None:
            out, lse = pallas_kernels.fold_sinks(out, lse, sinks)
        delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out)
        if given_delta:
            grads = pallas_kernels.attention_bwd(q, k, v, None, lse, d_out, delta=delta, **masking, **kw)
        else:
            grads = pallas_kernels.attention_bwd(q, k, v, out, lse, d_out, **masking, **kw)
        if sinks is not None:
            grads = (*grads, pallas_kernels.sinks_grad(lse, delta, sinks))
        return out, lse, grads

    return run


@pytest.mark.parametrize(
    "backend,B,T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,logit_soft_cap,sinks,offsets",
    list(backend_cases()),
)
def test_forward_and_backward_match_oracle(
    backend, B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, logit_soft_cap, sinks, offsets
):
    H, Hv = H if isinstance(H, tuple) else (H, H)  # q/k and v head dims
    q, k, v, d_out = random_qkv(T * S + Hv, B, T, N, K, H, S=S, dtype=dtype, Hv=Hv)
    q_ids = random_segments(T, B, T, 3) if segments else None
    kv_ids = random_segments(S + 1, B, S, 3) if segments else None
    # Sinks around the scores' own size, so that they take a real share of each row.
    sinks = jnp.asarray(np.random.default_rng(N * H).normal(1.0, 1.5, N), jnp.float32) if sinks else None
    run = kernels(backend.kernel, causal=causal, window=window, block_q=block_q, block_kv=block_kv,
                  given_delta=dtype != jnp.float32, logit_soft_cap=logit_soft_cap)
    for q_offset, kv_offset in offsets:
        out, lse, grads = run(q, k, v, d_out, q_ids, kv_ids, jnp.int32(q_offset), jnp.int32(kv_offset), sinks)
        expected = kernel_oracle(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, causal=causal, window=window,
                                 logit_soft_cap=logit_soft_cap, sinks=sinks)
        assert_kernel_matches_oracle(out, lse, grads, expected, dtype)


def _hidden_case(backend):
    """(shape and blocks, dtype) of a causal call, in each backend's tile shape, whose queries at
    0..T-1 and keys from T/2 on include whole key tiles (T/2 onwards locally) above the diagonal."""
    if backend.sixteen_bit_only:  # key tiles of 64 at head dim 128
        return dict(B=1, T=128, S=256, N=4, K=1, H=128, block_q=128, block_kv=128), jnp.bfloat16
    return dict(B=1, T=32, S=32, N=4, K=4, H=64, block_q=16, block_kv=16), jnp.float32


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_tiles_hidden_by_traced_offsets_are_skipped_not_masked(backend):
    # NaN in every key/value tile that causality hides from all queries: a computed-then-masked
    # tile would spread it (0 * NaN), a skipped one cannot. Offsets are traced, as in a ring.
    shape, dtype = _hidden_case(backend)
    B, T, S, N, K, H = (shape[x] for x in "BTSNKH")
    offset = T // 2
    q, k, v, d_out = random_qkv(5, B, T, N, K, H, S=S, dtype=dtype)
    k_nan, v_nan = k.at[:, offset:].set(jnp.nan), v.at[:, offset:].set(jnp.nan)
    run = kernels(backend.kernel, causal=True, window=None, block_q=shape["block_q"], block_kv=shape["block_kv"],
                  given_delta=dtype != jnp.float32)
    out, lse, (dq, dk, dv) = run(q, k_nan, v_nan, d_out, None, None, jnp.int32(0), jnp.int32(offset))
    assert np.all(np.isfinite(np.asarray(out))), "a tile wholly above the diagonal was computed"
    assert np.all(np.isfinite(np.asarray(dq))), "the dq kernel computed a tile wholly above the diagonal"
    np.testing.assert_array_equal(np.asarray(dk)[:, offset:], 0.0, err_msg="the dk/dv kernel computed it")
    np.testing.assert_array_equal(np.asarray(dv)[:, offset:], 0.0)
    expected = kernel_oracle(q, k, v, d_out, q_offset=0, kv_offset=offset, causal=True)
    assert_kernel_matches_oracle(out, lse, (dq, dk, dv), expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_tiles_with_no_common_segment_are_skipped(backend):
    # One document per tile, so id ranges are disjoint; the values of document 2, to which no
    # query belongs, are NaN, and must reach nothing.
    tile = 64 if backend.sixteen_bit_only else 8
    dtype = jnp.bfloat16 if backend.sixteen_bit_only else jnp.float32
    q, k, v, d_out = random_qkv(6, 2, 2 * tile, 2, 1, 64, S=3 * tile, dtype=dtype)
    q_ids = jnp.asarray(np.repeat([[0, 1], [1, 0]], tile, axis=1), jnp.int32)
    kv_ids = jnp.asarray(np.repeat([[0, 1, 2], [0, 1, 2]], tile, axis=1), jnp.int32)
    v_nan = v.at[:, 2 * tile:].set(jnp.nan)
    run = kernels(backend.kernel, causal=False, window=None, block_q=tile, block_kv=tile,
                  given_delta=dtype != jnp.float32)
    out, lse, (dq, dk, dv) = run(q, k, v_nan, d_out, q_ids, kv_ids, jnp.int32(0), jnp.int32(0))
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.all(np.isfinite(np.asarray(x))), f"{name}: a tile with no common segment was computed"
    expected = kernel_oracle(q, k, v, d_out, q_ids, kv_ids, causal=False)
    assert_kernel_matches_oracle(out, lse, (dq, dk, dv), expected, dtype)


def test_interpreters_poison_fresh_outputs():
    # The premise of "a missed write fails": the Triton (HLO) and Mosaic GPU interpreters hand a
    # kernel NaN-filled outputs, so a kernel that writes only its first block leaves NaN in the
    # rest. The TPU interpreter poisons an output block's buffer when the grid first visits it, and
    # (as the hardware does) carries that buffer into the next step: a block left unwritten first
    # is NaN, one left unwritten later holds the block before it, which the oracle comparison
    # rejects.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas import tpu as pltpu

    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 128)), jnp.float32)

    def first_block_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    block = pl.BlockSpec((8, 128), lambda i: (i, 0))
    triton = pl.pallas_call(first_block_only, grid=(2,), in_specs=[block], out_specs=block,
                            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)

    def copy_first_rows(x_ref, o_ref, smem, barrier):
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 8)], smem, barrier)
        plgpu.barrier_wait(barrier)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, o_ref.at[pl.ds(0, 8)])
        plgpu.wait_smem_to_gmem(0)

    mgpu = plgpu.kernel(copy_first_rows, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                        scratch_types=[plgpu.SMEM((8, 128), jnp.float32), plgpu.Barrier()],
                        interpret=attention_mgpu.interpret_params())
    for name, kernel in (("triton", triton), ("mosaic gpu", mgpu)):
        y = np.asarray(kernel(x))
        np.testing.assert_array_equal(y[:8], np.asarray(x[:8]), err_msg=name)
        assert np.isnan(y[8:]).all(), f"the {name} interpreter did not poison the rows the kernel left unwritten"

    def second_block_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 1)
        def _():
            o_ref[...] = x_ref[...]

    tpu = pl.pallas_call(second_block_only, grid=(2,), in_specs=[block], out_specs=block,
                         out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=pltpu.InterpretParams())
    y = np.asarray(tpu(x))
    assert np.isnan(y[:8]).all(), "the TPU interpreter did not poison the block the kernel left unwritten"
    np.testing.assert_array_equal(y[8:], np.asarray(x[8:]), err_msg="tpu")
