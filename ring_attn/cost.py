"""The ring's cost model: FLOPs and bytes of attention, and when compute hides the k/v transfer.

FLOPs follow the FlashAttention convention (matmuls only, 2 per multiply-add): the forward is
4·B·N·T·S·H, halved when causal; the backward is 2.5x the forward. A ring step computes a
[T] x [S] block while the next k/v shard (2·B·S·K·H elements) crosses one link, so the step
hides its transfer when 4·T·S·N·H / F >= 2·S·K·H·bytes / W: the local shard must hold at least
T = F / W · (K / N) · (bytes / 2) tokens, F/W for multi-head attention in bf16 (RingAttention,
arXiv 2310.01889, section 3). Its Table 2 takes the local sequence as 6 such blocks.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device of a ring: peak dense bf16 FLOP/s and one-way link bandwidth to its neighbour."""

    name: str
    flops_per_s: float
    bytes_per_s: float


# RingAttention's Table 2 rows, then Hopper (NVLink 4: 900 GB/s both ways, 450 GB/s one way).
HARDWARE = {
    "a100-nvlink": Hardware("A100 NVLink", 312e12, 300e9),
    "a100-infiniband": Hardware("A100 InfiniBand", 312e12, 12.5e9),
    "tpu-v3": Hardware("TPU v3", 123e12, 112e9),
    "tpu-v4": Hardware("TPU v4", 275e12, 268e9),
    "tpu-v5e": Hardware("TPU v5e", 196e12, 186e9),
    "h100-nvlink": Hardware("H100 SXM NVLink", 989e12, 450e9),
    "h200-nvlink": Hardware("H200 SXM NVLink", 989e12, 450e9),
}

# Tiles to start tuning from, by platform: (block_q, block_kv).
STARTING_BLOCKS = {"gpu": (128, 64), "tpu": (512, 512), "cpu": (256, 256)}

# RingAttention's Table 2: minimal sequence per device = 6 x the minimal block.
BLOCKS_PER_SHARD = 6


def attention_flops(B, N, T, S, H, causal=False, *, backward=False):
    """FLOPs of attention of T queries over S keys (forward, or backward = 2.5x forward)."""
    forward = 4 * B * N * T * S * H
    if causal:
        forward //= 2
    return int(forward * 2.5) if backward else forward


def attention_bytes(B, N, K, T, S, H, *, dtype_bytes=2, backward=False):
    """Bytes a fused kernel must move to and from memory: each operand read once, each result
    written once. Forward: q, k, v in; out (input dtype) and float32 lse out. Backward: q, k, v,
    out, d_out, lse and delta in; float32 dq, dk, dv out."""
    q_elems, kv_elems, rows = B * T * N * H, B * S * K * H, B * N * T
    if not backward:
        return dtype_bytes * (2 * q_elems + 2 * kv_elems) + 4 * rows
    return dtype_bytes * (3 * q_elems + 2 * kv_elems) + 4 * 2 * rows + 4 * (q_elems + 2 * kv_elems)


def ring_step_bytes(B, S, K, H, *, dtype_bytes=2, backward=False):
    """Bytes one ring step sends over one link: the k/v shard, and in the backward also the
    float32 dk/dv accumulators travelling with it."""
    kv = 2 * B * S * K * H
    return kv * dtype_bytes + (kv * 4 if backward else 0)


def min_block_size(flops_per_s, bytes_per_s, *, num_heads=1, num_kv_heads=1, dtype_bytes=2):
    """Shortest shard length T whose [T] x [T] forward step computes as long as its k/v take to
    arrive: T = F / W · (K / N) · (bytes / 2)."""
    return flops_per_s / bytes_per_s * (num_kv_heads / num_heads) * (dtype_bytes / 2)


def min_shard_length(flops_per_s, bytes_per_s, *, num_heads=1, num_kv_heads=1, dtype_bytes=2,
                     blocks_per_shard=BLOCKS_PER_SHARD):
    """Minimal local sequence per device, as RingAttention's Table 2 counts it (6 blocks)."""
    return blocks_per_shard * min_block_size(
        flops_per_s, bytes_per_s, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype_bytes=dtype_bytes
    )


@dataclasses.dataclass(frozen=True)
class RingAdvice:
    hides_communication: bool
    step_compute_s: float
    step_transfer_s: float
    min_shard_length: int
    block_q: int
    block_kv: int

    def __str__(self):
        verdict = "hides" if self.hides_communication else "does NOT hide"
        return (
            f"a ring step computes for {self.step_compute_s * 1e3:.3f} ms and sends for "
            f"{self.step_transfer_s * 1e3:.3f} ms: compute {verdict} communication "
            f"(shards of >= {self.min_shard_length} tokens do); start from "
            f"BlockSizes(block_q={self.block_q}, block_kv={self.block_kv})"
        )


def ring_advice(hardware, *, shard_length, num_heads, num_kv_heads, head_dim, batch=1, dtype_bytes=2,
                platform="gpu", causal=False, backward=False):
    """Whether a ring of `hardware` devices with local shards of `shard_length` tokens hides its
    k/v transfer behind compute, with block sizes to start tuning from.

    Causal work per step averages half a shard (zigzag layout); `backward` adds the 2.5x compute
    and the dk/dv accumulators on the link.
    """
    if isinstance(hardware, str):
        if hardware not in HARDWARE:
            raise ValueError(f"unknown hardware {hardware!r}; known: {sorted(HARDWARE)}")
        hardware = HARDWARE[hardware]
    if platform not in STARTING_BLOCKS:
        raise ValueError(f"unknown {platform=}; expected one of {sorted(STARTING_BLOCKS)}")
    T = shard_length
    flops = attention_flops(batch, num_heads, T, T, head_dim, causal, backward=backward)
    compute_s = flops / hardware.flops_per_s
    transfer_s = (
        ring_step_bytes(batch, T, num_kv_heads, head_dim, dtype_bytes=dtype_bytes, backward=backward)
        / hardware.bytes_per_s
    )
    needed = min_block_size(
        hardware.flops_per_s, hardware.bytes_per_s, num_heads=num_heads, num_kv_heads=num_kv_heads,
        dtype_bytes=dtype_bytes,
    )
    block_q, block_kv = (min(b, T) for b in STARTING_BLOCKS[platform])
    return RingAdvice(
        compute_s >= transfer_s, compute_s, transfer_s, math.ceil(needed * (2 if causal else 1)), block_q, block_kv
    )
