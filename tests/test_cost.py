"""The cost model: FLOP counts against the reference's own cost, and RingAttention's Table 2."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

import reference
from ring_attn import cost


@pytest.mark.parametrize(
    "hardware,expected_tokens",
    [("a100-nvlink", 6.2e3), ("a100-infiniband", 149.5e3), ("tpu-v4", 6.2e3), ("tpu-v5e", 6.3e3)],
)
def test_min_shard_length_reproduces_ringattention_table_2(hardware, expected_tokens):
    hw = cost.HARDWARE[hardware]
    got = cost.min_shard_length(hw.flops_per_s, hw.bytes_per_s)
    assert abs(got - expected_tokens) / expected_tokens < 0.10, f"{hardware}: {got:.0f} vs {expected_tokens:.0f}"


def test_flops_match_the_reference_cost_estimate():
    B, N, T, S, H = 1, 4, 256, 384, 64
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, S, N, H), jnp.float32)
    estimate = pl.estimate_cost(lambda q, k, v: reference.attention(q, k, v), q, kv, kv)
    matmul_flops = cost.attention_flops(B, N, T, S, H)
    # The estimate also counts the softmax's elementwise work, a few FLOPs per score.
    assert matmul_flops <= estimate.flops <= matmul_flops + 8 * B * N * T * S
    assert cost.attention_flops(B, N, T, S, H, causal=True) * 2 == matmul_flops
    assert cost.attention_flops(B, N, T, S, H, backward=True) == 2.5 * matmul_flops


def test_gqa_and_dtype_scale_the_minimal_block():
    mha = cost.min_block_size(312e12, 300e9)
    assert cost.min_block_size(312e12, 300e9, num_heads=32, num_kv_heads=8) == pytest.approx(mha / 4)
    assert cost.min_block_size(312e12, 300e9, dtype_bytes=4) == pytest.approx(2 * mha)


def test_ring_advice_says_whether_the_ring_hides_its_transfer():
    long = cost.ring_advice("a100-nvlink", shard_length=8192, num_heads=32, num_kv_heads=32, head_dim=128)
    short = cost.ring_advice("a100-infiniband", shard_length=8192, num_heads=32, num_kv_heads=32, head_dim=128)
    assert long.hides_communication and not short.hides_communication
    assert "does NOT hide" in str(short) and (long.block_q, long.block_kv) == cost.STARTING_BLOCKS["gpu"]
    with pytest.raises(ValueError, match="unknown hardware 'a200'"):
        cost.ring_advice("a200", shard_length=1024, num_heads=1, num_kv_heads=1, head_dim=64)
