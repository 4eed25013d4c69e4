"""The Mosaic GPU (Hopper) attention forward, pallas_kernels.attention_mgpu, run in Mosaic GPU
interpret mode on the CPU against the float64 oracle; and lowered for CUDA, which needs no GPU.

Interpret mode simulates each warpgroup as a thread, with TMA copies, barriers and wgmma as host
callbacks. In this JAX it compiles each simulated thread's program again at every grid point of
every call; the module fixture compiles each program once (a test-speed measure, nothing more).
Shapes are tiny and each compiled kernel is reused for several traced offsets.
"""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, assert_matches_oracle, oracle_with_lse, random_qkv, random_segments, ring_mesh
from jax.sharding import PartitionSpec

import ring_attn
from pallas_kernels import attention_mgpu, backend

FAST_COMPILE = {"xla_backend_optimization_level": 0}
SCALE = 0.3


@pytest.fixture(scope="module", autouse=True)
def compile_simulated_threads_once():
    from jax._src.pallas.mosaic.interpret import thread_map

    original, cache, lock = thread_map._run_jaxpr, {}, threading.Lock()

    def run(jaxpr, consts, *args):
        key = (id(jaxpr), tuple((np.shape(a), np.asarray(a).dtype.name) for a in (*consts, *args)))
        with lock:
            if key not in cache:
                fn = jax.jit(lambda consts, *args: jax.core.eval_jaxpr(jaxpr, consts, *args))
                cache[key] = (jaxpr, fn.lower(consts, *args).compile())  # jaxpr kept: its id stays unique
        cache[key][1](consts, *args)

    thread_map._run_jaxpr = run
    yield
    thread_map._run_jaxpr = original


@functools.cache
def forward(*, causal, window, block_q, block_kv):
    """The jitted interpreted forward; offsets and segment ids are traced arguments."""
    kw = dict(causal=causal, window=window, scale=SCALE, block_q=block_q, block_kv=block_kv, interpret=True)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v, q_ids, kv_ids, q_offset, kv_offset):
        return attention_mgpu.attention_fwd(
            q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset, **kw
        )

    return run


def oracle(q, k, v, *, q_ids, kv_ids, **masking):
    """float64 (out, lse)."""
    return oracle_with_lse(q, k, v, scale=SCALE, q_segment_ids=q_ids, kv_segment_ids=kv_ids, **masking)


def assert_forward_matches(out, lse, expected):
    """Rows that see no key: lse -inf and out 0; the others within the 16-bit tolerance."""
    expected_out, expected_lse = expected
    assert out.dtype == lse.dtype == jnp.float32
    assert out.shape == expected_out.shape and lse.shape == expected_lse.shape
    seen = np.isfinite(expected_lse)
    np.testing.assert_array_equal(np.isneginf(lse), ~seen, err_msg="rows that see no key have lse -inf")
    np.testing.assert_array_equal(np.asarray(out)[np.swapaxes(~seen, 1, 2)], 0.0, err_msg="and out 0")
    if seen.any():
        assert_close(out, expected_out, dtype=jnp.bfloat16, name="out")
        assert_close(np.asarray(lse)[seen], expected_lse[seen], dtype=jnp.bfloat16, name="lse")


CASES = [
    # (B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, [(q_offset, kv_offset), ...])
    # GQA 4:1, head dim 128 (key tiles of 64, so 4 of them), segments, causal. Offsets: on the
    # diagonal (the last two key tiles hidden); shifted so that whole tiles are hidden and query
    # rows 40..99 see no key; keys wholly in the future; keys wholly in the past.
    (1, 128, 256, 4, 1, 128, 128, 128, True, None, True, jnp.bfloat16, [(0, 0), (40, 100), (0, 200), (300, 0)]),
    # MHA 4:4, head dim 64, bidirectional, batch 2, blocks of 48 (padded to 64 rows).
    (2, 96, 96, 4, 4, 64, 48, 48, False, None, False, jnp.bfloat16, [(5, 0)]),
    # float16, head dim 80 (padded to 128), GQA 2:1, a causal sliding window.
    (1, 64, 128, 2, 1, 80, 64, 64, True, 24, False, jnp.float16, [(64, 0)]),
]


@pytest.mark.parametrize("B,T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype,offsets", CASES)
def test_forward_matches_oracle(B, T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype, offsets):
    q, k, v, _ = random_qkv(T * S + H, B, T, N, K, H, S=S, dtype=dtype)
    q_ids = random_segments(T, B, T, 3) if segments else None
    kv_ids = random_segments(S + 1, B, S, 3) if segments else None
    run = forward(causal=causal, window=window, block_q=block_q, block_kv=block_kv)
    for q_offset, kv_offset in offsets:  # one compiled kernel for every offset
        out, lse = run(q, k, v, q_ids, kv_ids, jnp.int32(q_offset), jnp.int32(kv_offset))
        expected = oracle(
            q, k, v, causal=causal, window=window, q_ids=q_ids, kv_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset
        )
        assert_forward_matches(out, lse, expected)


def test_hidden_tiles_are_skipped_not_masked():
    # NaN in key/value tiles that no query may see, by causality (keys 128..255 at offsets (0, 0))
    # or by segment (keys 64..127 hold a document no query belongs to): a tile computed and then
    # masked would spread the NaN (0 * NaN), a skipped one cannot. CASES[0]'s kernel, compiled.
    B, T, S, N, K, H = 1, 128, 256, 4, 1, 128
    q, k, v, _ = random_qkv(11, B, T, N, K, H, S=S, dtype=jnp.bfloat16)
    q_ids = jnp.zeros((B, T), jnp.int32)
    kv_ids = jnp.asarray((np.arange(S) // 64 == 1)[None], jnp.int32)
    hidden = ((np.arange(S) >= 128) | (np.arange(S) // 64 == 1))[None, :, None, None]
    k_nan, v_nan = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)
    run = forward(causal=True, window=None, block_q=128, block_kv=128)
    for q_offset, kv_offset in ((0, 0), (10, 30)):
        out, lse = run(q, k_nan, v_nan, q_ids, kv_ids, jnp.int32(q_offset), jnp.int32(kv_offset))
        assert np.all(np.isfinite(np.asarray(out))), "a hidden tile was computed"
        expected = oracle(
            q, k, v, causal=True, window=None, q_ids=q_ids, kv_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset
        )
        assert_forward_matches(out, lse, expected)


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
    "T,S,N,K,H,block_q,block_kv,causal,window,segments,dtype",
    [
        (256, 256, 8, 2, 128, 128, 128, True, None, True, jnp.bfloat16),
        (192, 96, 4, 4, 80, 96, 48, False, 40, False, jnp.float16),
        (128, 128, 4, 1, 64, 128, 128, True, None, False, jnp.bfloat16),
    ],
)
def test_kernel_lowers_for_cuda(T, S, N, K, H, block_q, block_kv, causal, window, segments, dtype):
    # Exporting for CUDA runs the Pallas -> Mosaic GPU lowering (register layouts, wgmma and TMA
    # shapes, barriers) without a GPU; inside shard_map with the vma check on, as a ring runs it.
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((2,), ("sp",), abstract_device=gpu)
    kw = dict(causal=causal, window=window, scale=0.125, block_q=block_q, block_kv=block_kv)

    def local(q, k, v, q_ids, kv_ids, kv_offset):
        q_offset = T * jax.lax.axis_index("sp")
        masking = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, q_offset=q_offset, kv_offset=kv_offset)
        return attention_mgpu.attention_fwd(q, k, v, **masking, **kw)

    seq, rows = PartitionSpec(None, "sp"), PartitionSpec(None, None, "sp")
    ids_spec = seq if segments else None
    fn = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(seq, seq, seq, ids_spec, ids_spec, PartitionSpec()), out_specs=(seq, rows),
    ))
    q = jax.ShapeDtypeStruct((1, 2 * T, N, H), dtype)
    kv = jax.ShapeDtypeStruct((1, 2 * S, K, H), dtype)
    q_ids = jax.ShapeDtypeStruct((1, 2 * T), jnp.int32) if segments else None
    kv_ids = jax.ShapeDtypeStruct((1, 2 * S), jnp.int32) if segments else None
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(fn, platforms=["cuda"])(
            q, kv, kv, q_ids, kv_ids, jax.ShapeDtypeStruct((), jnp.int32)
        )
    module = exported.mlir_module()
    assert "stablehlo.custom_call @mosaic_gpu" in module
    assert "wgmma" in module and "cp.async.bulk.tensor" in module  # the kernel really uses wgmma and TMA
