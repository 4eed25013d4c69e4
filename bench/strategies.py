"""The four context-parallel strategies side by side, one process, 8 simulated CPU devices.

Forward+backward of causal attention (zigzag layout) over global L tokens, B=1, N=8, K=8, H=64,
float32: `context_attention` with strategy "ring", "all_gather", "ulysses" (8 devices) and "usp"
(2 x 4: ring of 2 over Ulysses of 4), timed in turns (one call of each per round) so a change in
the host's load hits all alike; with each one's compiled temp memory per device and what
`ring_attn.cost.choose_strategy` predicts for this host ("cpu") beside it.

    python bench/strategies.py [--lengths 8192 32768] [--runs 3] [--json out.json]
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from timing import interleaved_median_times, matmul_ceiling  # noqa: E402

import ring_attn  # noqa: E402
from ring_attn.cost import attention_flops, choose_strategy  # noqa: E402

B, N, K, H = 1, 8, 8, 64
SETUPS = {"ring": (8,), "all_gather": (8,), "ulysses": (8,), "usp": (2, 4)}


def train_step(strategy, mesh_shape):
    """Gradients of sum(out * d_out) w.r.t. q, k, v, on shards already in zigzag order."""
    names = ("sp",) if len(mesh_shape) == 1 else ("ring", "uly")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), names)
    seq = P(None, names)
    attend = functools.partial(
        ring_attn.context_attention, axis_name=names[0] if len(names) == 1 else names, strategy=strategy,
        causal=True, layout="zigzag",
    )
    sharded = jax.shard_map(attend, mesh=mesh, in_specs=(seq, seq, seq), out_specs=seq)

    def loss(q, k, v, d_out):
        return jnp.sum(sharded(q, k, v) * d_out)

    return jax.grad(loss, argnums=(0, 1, 2)), mesh, seq


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ceiling = matmul_ceiling(args.runs)
    print(f"float32 matmul ceiling of the host: {ceiling / 1e9:.1f} GFLOP/s")
    rows = []
    for L in args.lengths:
        rng = np.random.default_rng(L)
        host = [rng.standard_normal((B, L, heads, H)).astype(np.float32) for heads in (N, K, K, N)]
        calls, temps = [], []
        for strategy, mesh_shape in SETUPS.items():
            step, mesh, seq = train_step(strategy, mesh_shape)
            sharding = jax.sharding.NamedSharding(mesh, seq)
            inputs = [jax.device_put(ring_attn.zigzag(x, 8), sharding) for x in host]
            compiled = jax.jit(step).lower(*inputs).compile()
            temps.append(compiled.memory_analysis().temp_size_in_bytes)
            calls.append((compiled, inputs))
        times = interleaved_median_times(calls, args.runs)
        flops = attention_flops(B, N, L, L, H, causal=True) * 3.5  # forward + backward (2.5x)
        predicted = choose_strategy("cpu", seq_len=L, num_devices=8, num_heads=N, num_kv_heads=K, head_dim=H,
                                    dtype_bytes=4, causal=True, layout="zigzag")
        for (strategy, mesh_shape), seconds, temp in zip(SETUPS.items(), times, temps):
            row = dict(L=L, strategy=strategy, mesh="x".join(map(str, mesh_shape)), seconds=seconds,
                       gflops=flops / seconds / 1e9, temp_mib=temp / 2**20, predicted_s=predicted.costs[strategy])
            rows.append(row)
            print(json.dumps(row), flush=True)
    # The 8 simulated devices share the host's cores: FLOP/s are the whole ring's, against the
    # ceiling of one matmul that has the host to itself.
    print(f"\nfwd+bwd, causal, zigzag, B={B} N={N} K={K} H={H} float32, 8 devices; "
          f"host matmul ceiling {ceiling / 1e9:.1f} GFLOP/s\n")
    print("| L | strategy | mesh | median s | GFLOP/s | of ceiling | temp MiB per device | "
          "vs ring | model's s (cpu) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ring = next(r for r in rows if r["L"] == row["L"] and r["strategy"] == "ring")
        print(f"| {row['L']} | {row['strategy']} | {row['mesh']} | {row['seconds']:.3f} | "
              f"{row['gflops']:.1f} | {row['gflops'] * 1e9 / ceiling:.0%} | "
              f"{row['temp_mib']:.1f} | {ring['seconds'] / row['seconds']:.2f}x | {row['predicted_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceiling_flops": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
