"""The ring contract with the Pallas kernels in interpret mode (GPU/Triton and TPU/Mosaic)."""

import functools

import pytest
from conftest import assert_matches_oracle, random_qkv, random_segments, ring_mesh

import ring_attn


def check(impl, *, ring_size=4, causal=True, layout="zigzag", window=None, check_vma=True, seed=0, N=8, K=2, H=64,
          Hv=None):
    B, T = 1, 16
    L = T * ring_size
    q, k, v, d_out = random_qkv(seed, B, L, N, K, H, Hv=Hv)
    ids = random_segments(seed + 1, B, L, 3)
    fn = functools.partial(
        ring_attn.ring_attention_global, mesh=ring_mesh(ring_size), axis_name="sp", causal=causal, layout=layout,
        window=window, segment_ids=ids, block_sizes=ring_attn.BlockSizes(8, 8), impl=impl, check_vma=check_vma,
    )

    # Interpret mode's cost is compiling the interpreter's loops: optimise them less.
    assert_matches_oracle(
        fn, q, k, v, d_out, compiler_options={"xla_backend_optimization_level": 0},
        causal=causal, window=window, q_segment_ids=ids, kv_segment_ids=ids,
    )


def test_triton_kernels_drive_a_zigzag_ring():
    check("pallas_triton", check_vma=False)


@pytest.mark.slow
def test_tpu_kernels_drive_a_zigzag_ring_under_shard_map_defaults():
    check("pallas_tpu", seed=1, N=2, K=1)  # fewer heads: interpreted TPU grid steps are slow


@pytest.mark.slow
def test_tpu_kernels_drive_a_sliding_window_ring():
    check("pallas_tpu", layout="contiguous", window=21, seed=2, N=2, K=1)


def test_triton_kernels_drive_an_mla_ring():
    # DeepSeek's q/k 192, v 128 (Triton pads q/k to 256 and v stays 128), causal contiguous, GQA.
    check("pallas_triton", layout="contiguous", check_vma=False, seed=3, N=4, K=2, H=192, Hv=128)


@pytest.mark.slow
def test_tpu_kernels_drive_an_mla_ring_of_8_with_wider_values():
    # Values wider than keys (32 / 64), zigzag, on a ring of 8.
    check("pallas_tpu", ring_size=8, seed=4, N=2, K=1, H=32, Hv=64)


def test_interpreted_gpu_kernels_under_check_vma_say_what_to_do():
    with pytest.raises(NotImplementedError, match="pass check_vma=False to jax.shard_map"):
        check("pallas_triton", check_vma=True)

