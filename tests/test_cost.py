"""The cost model: FLOP counts against the reference's own cost, and RingAttention's Table 2."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

import reference
from ring_attn import cost
from ring_attn.chips import CHIPS


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


def test_equal_value_head_dim_keeps_the_old_formulas():
    B, N, K, T, S, H = 2, 16, 4, 1024, 3072, 192
    X = B * N * T * S * H
    q, kv, rows = B * T * N * H, B * S * K * H, B * N * T
    for head_dim_v in (None, H):
        flops = functools.partial(cost.attention_flops, B, N, T, S, H, head_dim_v=head_dim_v)
        assert (flops(), flops(True), flops(backward=True), flops(True, backward=True)) == (4 * X, 2 * X, 10 * X, 5 * X)
        for dtype_bytes in (2, 4):
            io = functools.partial(cost.attention_bytes, B, N, K, T, S, H, head_dim_v=head_dim_v,
                                   dtype_bytes=dtype_bytes)
            assert io() == dtype_bytes * (2 * q + 2 * kv) + 4 * rows
            assert io(backward=True) == dtype_bytes * (3 * q + 2 * kv) + 8 * rows + 4 * (q + 2 * kv)
            step = functools.partial(cost.ring_step_bytes, B, S, K, H, head_dim_v=head_dim_v, dtype_bytes=dtype_bytes)
            assert (step(), step(backward=True)) == (2 * kv * dtype_bytes, 2 * kv * (dtype_bytes + 4))


def test_narrower_values_save_their_matmul_width_and_link_bytes():
    # DeepSeek-V3's MLA: q and k 192 wide, v 128. The forward's p·v and the backward's dp and dv
    # matmuls are Hv wide; a ring step sends Hv fewer values per token and kv head.
    B, N, K, T, S, H, Hv = 2, 16, 4, 1024, 3072, 192, 128
    per_width = 2 * B * N * T * S  # FLOPs of one T x S matmul per unit of contracted width
    for causal, share in ((False, 1), (True, 2)):
        full = functools.partial(cost.attention_flops, B, N, T, S, H, causal)
        mla = functools.partial(cost.attention_flops, B, N, T, S, H, causal, head_dim_v=Hv)
        assert full() - mla() == per_width * (H - Hv) // share
        assert full(backward=True) - mla(backward=True) == 2 * per_width * (H - Hv) // share
    shard = B * S * K * (H - Hv)  # v values no longer sent
    full = functools.partial(cost.ring_step_bytes, B, S, K, H)
    mla = functools.partial(cost.ring_step_bytes, B, S, K, H, head_dim_v=Hv)
    assert full() - mla() == 2 * shard
    assert full(backward=True) - mla(backward=True) == (2 + 4) * shard
    assert full(dtype_bytes=4) - mla(dtype_bytes=4) == 4 * shard
    # ring_advice sends and computes the same counts.
    advice = cost.ring_advice("h100-nvlink", shard_length=T, num_heads=N, num_kv_heads=K, head_dim=H, head_dim_v=Hv,
                              batch=B, backward=True)
    assert advice.step_transfer_s == B * T * K * (H + Hv) * (2 + 4) / 450e9
    assert advice.step_compute_s == 2 * B * N * T * T * (3 * H + 2 * Hv) / 989e12
    with pytest.raises(ValueError, match="head_dim_v.*head_dim_v=0"):
        cost.attention_flops(B, N, T, S, H, head_dim_v=0)


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


# choose_strategy: the shapes of published measurements, and the rules each strategy must obey.
LLAMA2_7B = dict(num_heads=32, num_kv_heads=32, head_dim=128)
QWEN_LIKE = dict(num_kv_heads=8, head_dim=128)


def test_hardware_keeps_its_fields_and_fills_in_the_new_ones():
    plain = cost.Hardware("x", 1e12, 1e9)
    assert plain.collective_bytes_per_s == plain.bytes_per_s and plain.memory_bytes == float("inf")
    a100 = cost.HARDWARE["a100-nvlink"]
    assert (a100.name, a100.flops_per_s, a100.bytes_per_s) == ("A100 NVLink", 312e12, 300e9)
    v5p = cost.HARDWARE["tpu-v5p"]
    assert (v5p.flops_per_s, v5p.memory_bytes) == (459e12, 95 * 2**30)
    assert v5p.bytes_per_s == pytest.approx(100e9) and v5p.collective_bytes_per_s == pytest.approx(600e9)
    for key, hw in cost.HARDWARE.items():
        assert 0 < hw.memory_bytes < float("inf") and hw.collective_bytes_per_s >= hw.bytes_per_s, key
    assert cost.HARDWARE["h200-nvlink"].memory_bytes == 141e9 and cost.HARDWARE["tpu-v5e"].memory_bytes == 16 * 2**30


def test_hardware_takes_compute_and_memory_from_the_chips_table():
    for chip_key, key in cost.CHIP_HARDWARE.items():
        hw, chip = cost.HARDWARE[key], CHIPS[chip_key]
        assert (hw.flops_per_s, hw.memory_bytes, hw.hbm_bytes_per_s) == (
            chip.flops_per_s, chip.memory_bytes, chip.hbm_bytes_per_s), key
    assert cost.HARDWARE["a100-infiniband"].hbm_bytes_per_s == CHIPS["a100"].hbm_bytes_per_s
    # NVLink 5: 1.8 TB/s both ways, 900 GB/s a direction, behind NVSwitch for collectives too.
    b200 = cost.HARDWARE["b200-nvlink"]
    assert b200.bytes_per_s == 900e9 == b200.collective_bytes_per_s and b200.flops_per_s == 2.25e15
    # v6e: 3,584 Gbit/s of ICI over the 4 links of its 2D torus.
    v6e = cost.HARDWARE["tpu-v6e"]
    assert v6e.bytes_per_s == pytest.approx(112e9) and v6e.collective_bytes_per_s == pytest.approx(448e9)
    assert v6e.memory_bytes == 32 * 2**30


@pytest.mark.parametrize("backend,key", [("tpu", "tpu-v5p"), ("gpu", "h100-nvlink"), ("cpu", "cpu"), ("METAL", "cpu")])
def test_default_hardware_follows_the_backend(monkeypatch, backend, key):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert cost.default_hardware() is cost.HARDWARE[key]


def test_maxtext_v5p_32k_cp16_ranks_the_ring_behind_all_gather_and_ulysses():
    # MaxText PR 4687: all-gather 8.83 s, Ulysses 8.90 s, ring 16.38 s per step.
    choice = cost.choose_strategy("tpu-v5p", seq_len=32768, num_devices=16, causal=True, **LLAMA2_7B)
    assert choice.costs["ring"] > max(choice.costs["all_gather"], choice.costs["ulysses"])
    assert choice.strategy in ("all_gather", "ulysses")
    # 2K tokens per device cannot hide a ring step's k/v behind its compute.
    assert choice.breakdown["ring"].exposed_s > choice.breakdown["ring"].compute_s


@pytest.mark.parametrize("num_heads", [32, 40])
def test_prime_rl_h200_64k_cp4_puts_ulysses_ahead_of_the_ring(num_heads):
    # prime-rl PR 2418: Ulysses +1% and ring -32% throughput against no context parallelism.
    choice = cost.choose_strategy("h200-nvlink", seq_len=65536, num_devices=4, num_heads=num_heads, **QWEN_LIKE)
    assert choice.costs["ulysses"] < choice.costs["ring"]
    # prime-rl's "ring" all-gathers K/V over contiguous shards: the last device's causal work sets the pace.
    contiguous = cost.choose_strategy(
        "h200-nvlink", seq_len=65536, num_devices=4, num_heads=num_heads, layout="contiguous", **QWEN_LIKE
    )
    assert contiguous.costs["all_gather"] > 1.5 * contiguous.costs["ulysses"]
    assert contiguous.costs["ulysses"] == pytest.approx(choice.costs["ulysses"])


def test_a_long_shard_on_a_fast_link_hides_the_ring_and_cannot_gather_the_sequence():
    # 1M tokens of a LLaMA-65B layer (64 heads, MHA) over 8 A100s: 128K tokens per device.
    shape = dict(num_heads=64, num_kv_heads=64, head_dim=128)
    choice = cost.choose_strategy("a100-nvlink", seq_len=2**20, num_devices=8, **shape)
    assert choice.costs["all_gather"] == float("inf") and choice.strategy != "all_gather"
    assert "all_gather" in choice.reason and "GB" in choice.reason
    advice = cost.ring_advice("a100-nvlink", shard_length=2**17, causal=True, backward=True, **shape)
    assert advice.hides_communication
    ring = choice.breakdown["ring"]
    assert ring.exposed_s < 0.01 * ring.compute_s
    # Memory to spare lets the gather run.
    roomy = cost.choose_strategy("a100-nvlink", seq_len=2**20, num_devices=8, memory_bytes=200e9, **shape)
    assert roomy.costs["all_gather"] < float("inf")


@pytest.mark.parametrize("head_dim_v", [None, 32, 128])
def test_balanced_strategies_share_the_compute(head_dim_v):
    N, L, H = 8, 16384, 64
    Hv = H if head_dim_v is None else head_dim_v
    choice = cost.choose_strategy("h100-nvlink", seq_len=L, num_devices=4, num_heads=N, num_kv_heads=2, head_dim=H,
                                  head_dim_v=head_dim_v)
    # Causal halves the forward's 2·N·L·L·(H + Hv) and the backward's 2·N·L·L·(3H + 2Hv).
    expected = N * L * L * ((H + Hv) + (3 * H + 2 * Hv)) / 4 / 989e12
    for name in cost.STRATEGIES:
        assert choice.breakdown[name].compute_s == pytest.approx(expected, rel=1e-6), name


@pytest.mark.parametrize("num_devices,usp_split", [(4, (2, 2)), (8, (4, 2)), (16, (8, 2)), (9, (3, 3)), (5, None)])
def test_heads_that_do_not_divide_rule_out_ulysses_and_usp_splits(num_devices, usp_split):
    choice = cost.choose_strategy("h100-nvlink", seq_len=2880, num_devices=num_devices, num_heads=6, num_kv_heads=6,
                                  head_dim=64)
    assert choice.costs["ulysses"] == float("inf") and "num_heads=6" in choice.reason
    assert choice.usp_split == usp_split
    assert (choice.costs["usp"] == float("inf")) == (usp_split is None)
    if usp_split:
        ring, ulysses = usp_split
        assert ring * ulysses == num_devices and 6 % ulysses == 0


def test_ulysses_replicates_kv_heads_when_devices_outnumber_them():
    gqa = cost.choose_strategy("h100-nvlink", seq_len=65536, num_devices=8, num_heads=32, num_kv_heads=2,
                               head_dim=128)
    assert gqa.costs["ulysses"] < float("inf")
    mha = cost.choose_strategy("h100-nvlink", seq_len=65536, num_devices=8, num_heads=32, num_kv_heads=8,
                               head_dim=128)
    # K/V move as 8 heads either way.
    assert gqa.breakdown["ulysses"].communication_s == pytest.approx(mha.breakdown["ulysses"].communication_s)
    odd = cost.choose_strategy("h100-nvlink", seq_len=65536, num_devices=8, num_heads=24, num_kv_heads=6,
                               head_dim=128)
    assert odd.costs["ulysses"] == float("inf")


def test_one_device_sends_nothing():
    choice = cost.choose_strategy("cpu", seq_len=4096, num_devices=1, num_heads=4, num_kv_heads=4, head_dim=64)
    for name in ("ring", "all_gather", "ulysses"):
        assert choice.breakdown[name].communication_s == 0 == choice.breakdown[name].exposed_s
    assert choice.strategy == "ring" and choice.usp_split is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hardware="b300"), "unknown hardware 'b300'"),
        (dict(num_devices=0), "num_devices.*num_devices=0"),
        (dict(num_devices=2.0), "num_devices.*num_devices=2.0"),
        (dict(seq_len=-1), "seq_len.*seq_len=-1"),
        (dict(num_heads=6, num_kv_heads=4), "num_heads=6.*num_kv_heads=4"),
        (dict(memory_bytes=0), "memory_bytes.*memory_bytes=0"),
        (dict(head_dim_v=0), "head_dim_v.*head_dim_v=0"),
        (dict(head_dim_v=64.0), "head_dim_v.*head_dim_v=64.0"),
        (dict(layout="striped"), "layout='striped'"),
    ],
)
def test_bad_input_names_the_argument_and_the_value(kwargs, match):
    args = dict(hardware="h100-nvlink", seq_len=4096, num_devices=4, num_heads=8, num_kv_heads=8, head_dim=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cost.choose_strategy(args.pop("hardware"), **args)


def test_str_is_a_table_with_every_strategy_and_the_reason():
    choice = cost.choose_strategy(cost.HARDWARE["tpu-v5p"], seq_len=32768, num_devices=16, **LLAMA2_7B)
    text = str(choice)
    assert text.splitlines()[0].split() == ["strategy", "compute", "s", "communication", "s", "exposed", "s", "total",
                                            "s"]
    for name in cost.STRATEGIES:
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert choice.reason in text and choice.reason.endswith(".")
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.strategy = "ring"
