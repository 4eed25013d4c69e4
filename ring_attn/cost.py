"""The ring's cost model: FLOPs and bytes of attention, when compute hides the k/v transfer, and
which context-parallel strategy a sequence-sharded axis should run.

FLOPs follow the FlashAttention convention (matmuls only, 2 per multiply-add). q and k have head
dim H, v and the output Hv (Hv = H but in multi-head latent attention): the forward is
2·B·N·T·S·(H + Hv) (q·kᵀ over H, p·v over Hv), halved when causal; the backward is
2·B·N·T·S·(3·H + 2·Hv) (q·kᵀ again, dq = ds·k and dk = dsᵀ·q over H; dp = d_out·vᵀ and
dv = pᵀ·d_out over Hv), 2.5x the forward when Hv = H. A ring step computes a [T] x [S] block
while the next k/v shard (B·S·K·(H + Hv) elements) crosses one link, so the step hides its
transfer when 2·T·S·N·(H + Hv) / F >= S·K·(H + Hv)·bytes / W: the local shard must hold at least
T = F / W · (K / N) · (bytes / 2) tokens whatever the head dims, F/W for multi-head attention in
bf16 (RingAttention, arXiv 2310.01889, section 3). Its Table 2 takes the local sequence as 6 such
blocks.

`choose_strategy` prices one layer (forward + backward) on one device of R for four strategies:
the ring (above), all-gather of K/V (Llama 3, arXiv 2407.21783, section 3.3.2), Ulysses
all-to-alls between sequence and head shards (DeepSpeed-Ulysses, arXiv 2309.14509) and their
product USP (arXiv 2405.07719). Compute runs at peak FLOP/s; each transfer moves its bytes at the
bandwidth it can use; a strategy's time is its compute plus what the compute does not hide.
"""

import dataclasses
import math

from ring_attn.chips import CHIPS

GiB = 2**30
FLOAT32 = 4


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device of a context-parallel axis.

    name, flops_per_s (peak dense bf16 FLOP/s) and bytes_per_s (one link direction to the next
    device: what a ppermute ring uses) are RingAttention's. The rest prices the other strategies:
    memory_bytes: HBM per device (inf: unknown). collective_bytes_per_s: what an all-gather,
    reduce-scatter or all-to-all achieves per device using every link of the topology (None: the
    same as bytes_per_s, as behind a switch, where one send already uses every link).
    step_latency_s: the fixed cost of a ring step or a collective (synchronisation, launches).
    hbm_bytes_per_s: memory bandwidth, which prices the ring's float32 merges (inf: free).
    """

    name: str
    flops_per_s: float
    bytes_per_s: float
    memory_bytes: float = math.inf
    collective_bytes_per_s: float | None = None
    step_latency_s: float = 0.0
    hbm_bytes_per_s: float = math.inf

    def __post_init__(self):
        if self.collective_bytes_per_s is None:
            object.__setattr__(self, "collective_bytes_per_s", self.bytes_per_s)


# Compute, memory and HBM bandwidth: the chips' spec sheets (`ring_attn.chips`). Links:
# RingAttention's Table 2 rows for A100 (NVLink 300 GB/s, InfiniBand 12.5 GB/s) and TPU v4 and v5e
# (its TPU links are of the order of a chip's whole ICI bandwidth, e.g. v5e 1,600 Gbit/s = 186 GiB/s,
# so they also stand for the collectives and flatter a one-direction ring; kept as published), then
# NVLink 4 for Hopper (900 GB/s both ways, 450 GB/s one way) and NVLink 5 for Blackwell (1.8 TB/s,
# 900 GB/s). Behind NVSwitch one send already uses all of a GPU's NVLinks, so collectives get the
# same bandwidth. TPU v5p: ICI 4,800 Gbit/s per chip over the 6 links of its 3D torus, i.e. 100 GB/s
# per link direction for a ring and 600 GB/s for a collective over all six; v6e: 3,584 Gbit/s over
# the 4 links of its 2D torus, 112 GB/s and 448 GB/s. TPU v3 (not in `ring_attn.chips`): 123
# TFLOP/s bf16, 32 GiB at 900 GB/s, RingAttention's link.
# Step latencies are this model's assumptions, not measurements: a few microseconds of link
# latency plus a kernel launch and a synchronisation per step (more over InfiniBand and between
# host devices). "cpu": a modest host, its devices exchanging by memory copies.


def _chip_hardware(name, chip, bytes_per_s, **links):
    """A `Hardware` whose compute and memory are `ring_attn.chips`'s figures for `chip`."""
    spec = CHIPS[chip]
    return Hardware(name, spec.flops_per_s, bytes_per_s, memory_bytes=spec.memory_bytes,
                    hbm_bytes_per_s=spec.hbm_bytes_per_s, **links)


HARDWARE = {
    "a100-nvlink": _chip_hardware("A100 NVLink", "a100", 300e9, step_latency_s=10e-6),
    "a100-infiniband": _chip_hardware("A100 InfiniBand", "a100", 12.5e9, step_latency_s=20e-6),
    "tpu-v3": Hardware("TPU v3", 123e12, 112e9, memory_bytes=32 * GiB, step_latency_s=5e-6, hbm_bytes_per_s=900e9),
    "tpu-v4": _chip_hardware("TPU v4", "v4", 268e9, step_latency_s=5e-6),
    "tpu-v5e": _chip_hardware("TPU v5e", "v5e", 186e9, step_latency_s=5e-6),
    "tpu-v5p": _chip_hardware(
        "TPU v5p", "v5p", 4800e9 / 8 / 6, collective_bytes_per_s=4800e9 / 8, step_latency_s=5e-6
    ),
    "tpu-v6e": _chip_hardware(
        "TPU v6e", "v6e", 3584e9 / 8 / 4, collective_bytes_per_s=3584e9 / 8, step_latency_s=5e-6
    ),
    "h100-nvlink": _chip_hardware("H100 SXM NVLink", "h100", 450e9, step_latency_s=10e-6),
    "h200-nvlink": _chip_hardware("H200 SXM NVLink", "h200", 450e9, step_latency_s=10e-6),
    "b200-nvlink": _chip_hardware("B200 NVLink", "b200", 900e9, step_latency_s=10e-6),
    "cpu": Hardware("host CPU", 1e11, 1e10, memory_bytes=16 * GiB, step_latency_s=50e-6, hbm_bytes_per_s=1e10),
}

# The entry that prices a ring of each chip of `ring_attn.chips` that `ring_attn.aot` compiles for:
# the links within a host or slice.
CHIP_HARDWARE = {
    "a100": "a100-nvlink", "h100": "h100-nvlink", "h200": "h200-nvlink", "b200": "b200-nvlink",
    "v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e",
}

# What `default_hardware` assumes for each `jax.default_backend()`; anything else is "cpu".
DEFAULT_HARDWARE = {"tpu": "tpu-v5p", "gpu": "h100-nvlink"}


def default_hardware():
    """The `HARDWARE` entry for `jax.default_backend()`: "tpu" -> "tpu-v5p", "gpu" ->
    "h100-nvlink", anything else -> "cpu"."""
    import jax  # only here: the model itself needs no JAX

    return HARDWARE[DEFAULT_HARDWARE.get(jax.default_backend(), "cpu")]


def _hardware(hardware):
    if isinstance(hardware, Hardware):
        return hardware
    if not isinstance(hardware, str) or hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {sorted(HARDWARE)}")
    return HARDWARE[hardware]


def _positive(name, value, integer=True):
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {name}={value!r}")


def _value_head_dim(head_dim, head_dim_v):
    """v's head dim: head_dim_v, checked, or head_dim when None."""
    if head_dim_v is None:
        return head_dim
    _positive("head_dim_v", head_dim_v)
    return head_dim_v


# Tiles to start tuning from, by platform: (block_q, block_kv).
STARTING_BLOCKS = {"gpu": (128, 64), "tpu": (512, 512), "cpu": (256, 256)}

# RingAttention's Table 2: minimal sequence per device = 6 x the minimal block.
BLOCKS_PER_SHARD = 6


def attention_flops(B, N, T, S, H, causal=False, *, head_dim_v=None, backward=False):
    """FLOPs of attention of T queries over S keys, q and k of head dim H and v of head_dim_v
    (None: H); forward, or backward (2.5x the forward when the head dims are equal)."""
    Hv = _value_head_dim(H, head_dim_v)
    # Counted from the matmul widths in integers: with Hv != H the backward is no round multiple of the forward.
    flops = 2 * B * N * T * S * ((3 * H + 2 * Hv) if backward else (H + Hv))
    return flops // 2 if causal else flops


def _backward_per_forward(H, Hv):
    """The backward's FLOPs over the forward's (see `attention_flops`): 2.5 when Hv == H."""
    return (3 * H + 2 * Hv) / (H + Hv)


def attention_bytes(B, N, K, T, S, H, *, head_dim_v=None, dtype_bytes=2, backward=False):
    """Bytes a fused kernel must move to and from memory: each operand read once, each result
    written once. Forward: q, k, v in; out (input dtype) and float32 lse out. Backward: q, k, v,
    out, d_out, lse and delta in; float32 dq, dk, dv out. v, out, d_out and dv have head dim
    head_dim_v (None: H)."""
    Hv = _value_head_dim(H, head_dim_v)
    q_elems, out_elems, rows = B * T * N * H, B * T * N * Hv, B * N * T
    k_elems, v_elems = B * S * K * H, B * S * K * Hv
    if not backward:
        return dtype_bytes * (q_elems + out_elems + k_elems + v_elems) + 4 * rows
    return (dtype_bytes * (q_elems + 2 * out_elems + k_elems + v_elems) + 4 * 2 * rows
            + 4 * (q_elems + k_elems + v_elems))


def ring_step_bytes(B, S, K, H, *, head_dim_v=None, dtype_bytes=2, backward=False):
    """Bytes one ring step sends over one link: the k shard (head dim H) and v shard (head_dim_v,
    None: H), and in the backward also the float32 dk/dv accumulators travelling with them."""
    kv = B * S * K * (H + _value_head_dim(H, head_dim_v))
    return kv * dtype_bytes + (kv * 4 if backward else 0)


def min_block_size(flops_per_s, bytes_per_s, *, num_heads=1, num_kv_heads=1, dtype_bytes=2):
    """Shortest shard length T whose [T] x [T] forward step computes as long as its k/v take to
    arrive: T = F / W · (K / N) · (bytes / 2). The head dims cancel: the step's FLOPs and its k/v
    bytes both scale with H + Hv."""
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


def ring_advice(hardware, *, shard_length, num_heads, num_kv_heads, head_dim, head_dim_v=None, batch=1,
                dtype_bytes=2, platform="gpu", causal=False, backward=False):
    """Whether a ring of `hardware` devices with local shards of `shard_length` tokens hides its
    k/v transfer behind compute, with block sizes to start tuning from. head_dim is q and k's,
    head_dim_v v's (None: head_dim).

    Causal work per step averages half a shard (zigzag layout); `backward` adds its compute
    (2.5x with equal head dims) and the dk/dv accumulators on the link.
    """
    hardware = _hardware(hardware)
    if platform not in STARTING_BLOCKS:
        raise ValueError(f"unknown {platform=}; expected one of {sorted(STARTING_BLOCKS)}")
    T = shard_length
    flops = attention_flops(batch, num_heads, T, T, head_dim, causal, head_dim_v=head_dim_v, backward=backward)
    compute_s = flops / hardware.flops_per_s
    step_bytes = ring_step_bytes(
        batch, T, num_kv_heads, head_dim, head_dim_v=head_dim_v, dtype_bytes=dtype_bytes, backward=backward
    )
    transfer_s = step_bytes / hardware.bytes_per_s
    needed = min_block_size(
        hardware.flops_per_s, hardware.bytes_per_s, num_heads=num_heads, num_kv_heads=num_kv_heads,
        dtype_bytes=dtype_bytes,
    )
    block_q, block_kv = (min(b, T) for b in STARTING_BLOCKS[platform])
    return RingAdvice(
        compute_s >= transfer_s, compute_s, transfer_s, math.ceil(needed * (2 if causal else 1)), block_q, block_kv
    )


# The strategies `choose_strategy` prices, in the order it breaks ties.
STRATEGIES = ("ring", "all_gather", "ulysses", "usp")
LAYOUTS = ("contiguous", "zigzag")  # as ring_attn.layout.LAYOUTS, without importing JAX

# The all-gather strategy splits its gather (and its backward's reduce-scatter) in this many chunks
# over kv heads, each overlapping the compute on the chunk before, as MaxText's and
# ring-flash-attn's all-gather attention do; the first chunk's gather (and the last one's
# reduce-scatter) has nothing to hide behind. Two is this model's assumption.
ALL_GATHER_CHUNKS = 2


@dataclasses.dataclass(frozen=True)
class StrategyCost:
    """Predicted seconds of one layer's attention, forward + backward, on the busiest device.

    compute_s: FLOPs at peak. communication_s: every byte sent, at the bandwidth it gets.
    exposed_s: what compute does not hide: transfers not overlapped, per-step latencies and the
    ring's float32 merges. total_s = compute_s + exposed_s. note: why the strategy cannot run.
    """

    compute_s: float
    communication_s: float
    exposed_s: float
    note: str = ""

    @property
    def total_s(self):
        return self.compute_s + self.exposed_s


def _cannot(note):
    return StrategyCost(math.inf, math.inf, math.inf, note)


def _pipelined(transfer_s, compute_s, chunks):
    """Exposed time of a transfer cut into `chunks`, each overlapping the compute on one other
    chunk: one chunk's transfer is exposed whole, the others by what a chunk's compute leaves."""
    transfer, compute = transfer_s / chunks, compute_s / chunks
    return transfer + (chunks - 1) * max(0.0, transfer - compute)


def _ring(hw, *, B, N, K, T, R, H, Hv, dtype_bytes, causal, layout):
    """R steps forward and R backward; each step's compute overlaps the send of the next shard
    over one link direction (the backward's also carries the float32 dk/dv accumulators, which go
    home in one more send at the end). Every step but the first merges in float32 in memory.

    Causal: zigzag gives every step half a block; contiguous leaves the last device a causal
    diagonal and R-1 whole blocks, and the ring goes at its pace."""
    F = hw.flops_per_s
    diagonal = attention_flops(B, N, T, T, H, causal, head_dim_v=Hv)
    later = attention_flops(B, N, T, T, H, causal and layout == "zigzag", head_dim_v=Hv)
    steps_f = [diagonal] + [later] * (R - 1)
    compute_f = [f / F for f in steps_f]
    compute_b = [_backward_per_forward(H, Hv) * c for c in compute_f]
    compute = sum(compute_f) + sum(compute_b)
    if R == 1:
        return StrategyCost(compute, 0.0, 0.0)
    send_f = ring_step_bytes(B, T, K, H, head_dim_v=Hv, dtype_bytes=dtype_bytes) / hw.bytes_per_s
    send_b = ring_step_bytes(B, T, K, H, head_dim_v=Hv, dtype_bytes=dtype_bytes, backward=True) / hw.bytes_per_s
    home = B * T * K * (H + Hv) * FLOAT32 / hw.bytes_per_s
    # The shard for step s + 1 travels during step s, so steps 0 .. R-2 each hide one send.
    waits = sum(max(0.0, send_f - c) for c in compute_f[:-1]) + sum(max(0.0, send_b - c) for c in compute_b[:-1])
    # Forward: read the running (out, lse), read the step's, write the merged one. Backward: the
    # same for the dq and dk/dv accumulators.
    merge_bytes = 3 * FLOAT32 * B * T * (N * (Hv + 1) + (N + K) * H + K * Hv)
    overhead = (R - 1) * merge_bytes / hw.hbm_bytes_per_s + (2 * R - 1) * hw.step_latency_s
    return StrategyCost(compute, (R - 1) * (send_f + send_b) + home, waits + home + overhead)


def _all_gather(hw, *, B, N, K, T, R, H, Hv, dtype_bytes, causal, layout, memory_bytes):
    """All-gather k and v (each device receives (R-1)/R of the sequence's K/V), attend the local
    queries to all of it; the backward gathers again and reduce-scatters float32 dk, dv. The
    whole sequence's K/V and dK/dV must fit in memory at once."""
    S = T * R
    need = B * S * K * (H + Hv) * (dtype_bytes + FLOAT32)
    if need > memory_bytes:
        return _cannot(
            f"the whole sequence's K/V and float32 dK/dV take {need / 1e9:.1f} GB > "
            f"memory_bytes={memory_bytes / 1e9:.1f} GB"
        )
    full = attention_flops(B, N, T, S, H, head_dim_v=Hv)
    if not causal:
        flops = full
    elif layout == "zigzag":
        flops = attention_flops(B, N, T, S, H, causal=True, head_dim_v=Hv)
    else:  # the last device's queries see the whole sequence bar half their own shard
        flops = full * (S - T / 2) / S
    compute_f = flops / hw.flops_per_s
    compute_b = _backward_per_forward(H, Hv) * compute_f
    if R == 1:
        return StrategyCost(compute_f + compute_b, 0.0, 0.0)
    kv = B * S * K * (H + Hv) * (R - 1) / R
    gather = kv * dtype_bytes / hw.collective_bytes_per_s
    scatter = kv * FLOAT32 / hw.collective_bytes_per_s
    n = ALL_GATHER_CHUNKS
    exposed = _pipelined(gather, compute_f, n) + _pipelined(gather + scatter, compute_b, n) + 3 * n * hw.step_latency_s
    return StrategyCost(compute_f + compute_b, 2 * gather + scatter, exposed)


def _ulysses_fits(N, K, u):
    return N % u == 0 and (K % u == 0 or u % K == 0)


def _all_to_alls(hw, *, B, N, K, T, u, H, Hv, dtype_bytes):
    """Seconds of Ulysses' all-to-alls over u devices, forward (q, k, v in, out back) and backward
    (d_out in, dq, dk, dv back): each device keeps 1/u of its shard and sends the rest. With fewer
    kv heads than devices (u % K == 0) each kv head goes to u/K devices, so K/V move as u heads.
    q, k, dq, dk have head dim H; v, out, d_out, dv have Hv."""
    kv_heads = max(K, u)
    elems = 2 * B * T * (N + kv_heads) * (H + Hv)
    return elems * dtype_bytes * (u - 1) / u / hw.collective_bytes_per_s


def _ulysses(hw, *, B, N, K, T, R, H, Hv, dtype_bytes, causal):
    """All-to-alls turn sequence shards into head shards; each device attends N/R heads over the
    whole sequence (balanced whatever the layout); nothing overlaps the all-to-alls."""
    if not _ulysses_fits(N, K, R):
        return _cannot(
            f"Ulysses over {R} devices needs num_heads % {R} == 0 and num_kv_heads % {R} == 0 or {R} % num_kv_heads "
            f"== 0, got num_heads={N}, num_kv_heads={K}"
        )
    S = T * R
    forward = attention_flops(B, N // R, S, S, H, causal, head_dim_v=Hv)
    backward = attention_flops(B, N // R, S, S, H, causal, head_dim_v=Hv, backward=True)
    compute = (forward + backward) / hw.flops_per_s
    if R == 1:
        return StrategyCost(compute, 0.0, 0.0)
    a2a = _all_to_alls(hw, B=B, N=N, K=K, T=T, u=R, H=H, Hv=Hv, dtype_bytes=dtype_bytes)
    return StrategyCost(compute, a2a, a2a + 4 * hw.step_latency_s)


def _usp(hw, *, B, N, K, T, R, H, Hv, dtype_bytes, causal, layout):
    """Ulysses over u devices, then a ring of r = R/u over the u-times longer shards of N/u heads;
    the cheapest split with 1 < u < R whose u satisfies Ulysses' head rules, as (cost, (r, u))."""
    best, split = None, None
    for u in range(2, R):
        if R % u or not _ulysses_fits(N, K, u):
            continue
        r = R // u
        a2a = _all_to_alls(hw, B=B, N=N, K=K, T=T, u=u, H=H, Hv=Hv, dtype_bytes=dtype_bytes)
        ring = _ring(
            hw, B=B, N=N // u, K=max(K, u) // u, T=T * u, R=r, H=H, Hv=Hv, dtype_bytes=dtype_bytes, causal=causal,
            layout=layout,
        )
        cost = StrategyCost(ring.compute_s, a2a + ring.communication_s, a2a + 4 * hw.step_latency_s + ring.exposed_s)
        if best is None or cost.total_s < best.total_s:
            best, split = cost, (r, u)
    if best is None:
        note = f"no split of {R} devices into ring x Ulysses (both > 1) has a Ulysses size dividing the heads"
        return _cannot(note), None
    return best, split


@dataclasses.dataclass(frozen=True)
class StrategyChoice:
    """`choose_strategy`'s answer: the strategy, every strategy's predicted seconds per layer
    (forward + backward; inf where it cannot run), the (ring, ulysses) split behind costs["usp"]
    (None where no split can run), a one-sentence reason, and each cost's breakdown."""

    strategy: str
    costs: dict
    usp_split: tuple | None
    reason: str
    breakdown: dict

    def __str__(self):
        rows = [f"{'strategy':<16}{'compute s':>12}{'communication s':>17}{'exposed s':>12}{'total s':>12}"]
        for name, c in self.breakdown.items():
            label = f"usp {self.usp_split[0]}x{self.usp_split[1]}" if name == "usp" and self.usp_split else name
            mark = " <" if name == self.strategy else ""
            rows.append(
                f"{label:<16}{c.compute_s:>12.4g}{c.communication_s:>17.4g}{c.exposed_s:>12.4g}{c.total_s:>12.4g}{mark}"
            )
        return "\n".join(rows + [self.reason])


def _time(seconds):
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def choose_strategy(hardware, *, seq_len, num_devices, num_heads, num_kv_heads, head_dim, head_dim_v=None, batch=1,
                    dtype_bytes=2, causal=True, memory_bytes=None, layout="zigzag"):
    """Which context-parallel strategy runs a layer's attention fastest over `num_devices` devices
    of `hardware` (a `Hardware`, a `HARDWARE` key, or None for `default_hardware()`), each holding
    seq_len / num_devices tokens (padded up), forward + backward. head_dim is q and k's head dim,
    head_dim_v v's and the output's (None: head_dim).

    Every strategy does the same FLOPs in all (1/R each, where the layout balances them); they
    differ in what they send and how much of it compute hides (see `StrategyCost`):
    - "ring": per step, max(0, transfer - compute) over one link direction, a step latency and a
      float32 merge in memory.
    - "all_gather": the gather, and in the backward a second gather and a float32 reduce-scatter,
      pipelined over ALL_GATHER_CHUNKS chunks; inf where the whole sequence's K/V and dK/dV do
      not fit in `memory_bytes` (None: the device's HBM).
    - "ulysses": four all-to-alls, none hidden; inf unless the heads divide over the devices.
    - "usp": the best ring x Ulysses split; its all-to-alls plus the ring's exposed time.
    `layout`: "zigzag" balances causal work; "contiguous" leaves the ring's and the all-gather's
    last device (R - 1/2) blocks of work where the average is R/2, and everyone waits for it.
    """
    hw = default_hardware() if hardware is None else _hardware(hardware)
    for name, value in [("seq_len", seq_len), ("num_devices", num_devices), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("batch", batch)]:
        _positive(name, value)
    _positive("dtype_bytes", dtype_bytes, integer=False)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, {num_kv_heads=}")
    if memory_bytes is not None:
        _positive("memory_bytes", memory_bytes, integer=False)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown {layout=}; expected one of {LAYOUTS}")
    R, N, K, H = num_devices, num_heads, num_kv_heads, head_dim
    T = -(-seq_len // R)
    shape = dict(B=batch, N=N, K=K, T=T, R=R, H=H, Hv=_value_head_dim(H, head_dim_v), dtype_bytes=dtype_bytes,
                 causal=causal)
    usp, usp_split = _usp(hw, **shape, layout=layout)
    breakdown = {
        "ring": _ring(hw, **shape, layout=layout),
        "all_gather": _all_gather(
            hw, **shape, layout=layout, memory_bytes=hw.memory_bytes if memory_bytes is None else memory_bytes
        ),
        "ulysses": _ulysses(hw, **shape),
        "usp": usp,
    }
    costs = {name: c.total_s for name, c in breakdown.items()}
    best, runner = sorted(STRATEGIES, key=lambda s: (costs[s], STRATEGIES.index(s)))[:2]
    b, r = breakdown[best], breakdown[runner]
    if R == 1:
        reason = f"one device sends nothing, so every strategy is local attention and {best} does ({_time(b.total_s)})"
    else:
        versus = (
            f"{runner}'s {_time(r.compute_s)} + {_time(r.exposed_s)}"
            if math.isfinite(r.total_s) else "nothing else, which cannot run"
        )
        reason = (
            f"{best} is fastest: {_time(b.compute_s)} of compute and {_time(b.exposed_s)} exposed per layer, "
            f"against {versus}"
        )
    notes = [f"{name}: {c.note}" for name, c in breakdown.items() if c.note]
    reason += "".join(f"; {n}" for n in notes) + "."
    return StrategyChoice(best, costs, usp_split, reason, breakdown)
