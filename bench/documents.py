"""Packed short documents end the ring early: documents of at most L/16 tokens against one
document of L, forward+backward of causal ring attention (contiguous layout) on R = 8 simulated
CPU devices, B=1, N=8, K=8, H=64, float32, the default kernel. Timed in turns (one call of each
per round) so that a change in the host's load hits all alike.

Beside each time: the ring steps the segment ids need (`ring_attn.ring.document_steps`, as the
ring computes them) and the k/v-sized transfers that follows per device: forward, steps - 1 k/v
shards; backward, steps - 1 k/v shards, steps - 1 dk/dv accumulators and one dk/dv hop home per
bit set in steps - 1. A causal ring without segment ids is timed as the baseline of a full ring.

    python bench/documents.py [--length 16384] [--runs 3] [--json out.json]
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from timing import interleaved_median_times, matmul_ceiling  # noqa: E402

import ring_attn  # noqa: E402
from ring_attn.ring import document_steps  # noqa: E402

R, B, N, K, H = 8, 1, 8, 8, 64


def packings(L, seed=0):
    """Segment ids [1, L] of each case: None (no ids), one document, documents of L/64..L/16."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < L:
        lengths.append(int(rng.integers(L // 64, L // 16 + 1)))
    short = np.repeat(np.arange(len(lengths)), lengths)[:L]
    return {
        "causal, no segment ids": None,
        "one document of L": jnp.zeros((B, L), jnp.int32),
        f"{len(lengths)} documents of <= L/16": jnp.asarray(short[None], jnp.int32),
    }


def train_step(mesh, ids):
    """Gradients of sum(out * d_out) w.r.t. q, k, v."""
    attend = functools.partial(ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", causal=True,
                               segment_ids=ids)
    return jax.jit(jax.grad(lambda q, k, v, d_out: jnp.sum(attend(q, k, v) * d_out), argnums=(0, 1, 2)))


def transfers(steps, segments):
    """k/v-sized sends per device: (forward, backward). Every step of a ring of more than one
    step sends (the last step's shard too, wasted: the price of a loop with no step peeled off);
    in the backward the dk/dv accumulators travel with each, and go home after the last."""
    if steps == 1:
        return 0, 0
    home = bin(steps - 1).count("1") if segments else 1
    return steps, 2 * steps + home


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    L = args.length
    ceiling = matmul_ceiling(args.runs)
    print(f"float32 matmul ceiling of the host: {ceiling / 1e9:.1f} GFLOP/s")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:R]), ("sp",))
    seq = P(None, "sp")
    rng = np.random.default_rng(1)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((B, L, n, H)), jnp.float32) for n in (N, K, K, N))
    steps_of = jax.jit(jax.shard_map(lambda ids: document_steps(ids, ids, "sp"), mesh=mesh, in_specs=seq,
                                     out_specs=P()))

    calls, rows = [], []
    for name, ids in packings(L).items():
        calls.append((train_step(mesh, ids), (q, k, v, d_out)))
        steps = R if ids is None else int(steps_of(ids))
        forward, backward = transfers(steps, ids is not None)
        rows.append(dict(case=name, ring_steps=steps, kv_transfers_forward=forward, kv_transfers_backward=backward))
    times = interleaved_median_times(calls, args.runs)
    base = times[1]
    print(f"L={L}, R={R}, B={B}, N={N}, K={K}, H={H}, float32, forward+backward")
    print(f"{'case':<28} {'ring steps':>10} {'k/v transfers (fwd+bwd)':>24} {'time (s)':>9} {'vs one doc':>10}")
    for row, t in zip(rows, times):
        row.update(seconds=t, speedup_vs_one_document=base / t)
        moves = f"{row['kv_transfers_forward']} + {row['kv_transfers_backward']}"
        print(f"{row['case']:<28} {row['ring_steps']:>10} {moves:>24} {t:>9.2f} {base / t:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(length=L, ring=R, matmul_ceiling_flops=ceiling, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
