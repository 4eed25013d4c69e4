"""The main job on embedded defaults: causal ring attention over a 64K-token sequence.

    python -m ring_attn.demo [--length 65536] [--ring-size 8] [--layout zigzag]

On a machine without accelerators it simulates the ring with CPU devices. It checks sampled
query rows against exact float64 attention computed with numpy, and prints the time and the
per-device memory of the compiled program.
"""

import argparse
import os
import sys
import time


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m ring_attn.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65536, help="global sequence length (default 65536)")
    parser.add_argument("--ring-size", type=int, default=8, help="devices in the ring (default 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2, help="query heads N")
    parser.add_argument("--kv-heads", type=int, default=1, help="key/value heads K (grouped-query attention)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag")
    parser.add_argument("--rows", type=int, default=16, help="query rows checked against exact attention")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("length", "ring_size", "batch", "heads", "kv_heads", "head_dim", "rows"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.length % (2 * args.ring_size):
        parser.error(f"--length {args.length} must be divisible by 2 * --ring-size = {2 * args.ring_size}")
    return args


def exact_rows(q, k, v, rows, scale):
    """Causal attention of the given query rows in float64: the check that needs no ring."""
    import numpy as np

    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    out = np.empty((q.shape[0], len(rows), q.shape[2], q.shape[3]))
    for r, i in enumerate(rows):
        keys, values = np.repeat(k[:, : i + 1], group, 2), np.repeat(v[:, : i + 1], group, 2)  # [B, i+1, N, H]
        s = np.einsum("bnh,bsnh->bns", q[:, i], keys) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, r] = np.einsum("bns,bsnh->bnh", p / p.sum(-1, keepdims=True), values)
    return out


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # A host without accelerators simulates the ring; this must happen before jax starts.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.ring_size}"
    )
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ring_attn

    devices = jax.devices()
    if len(devices) < args.ring_size:
        sys.exit(f"--ring-size {args.ring_size} needs that many devices; this host has {len(devices)}")
    mesh = Mesh(np.array(devices[: args.ring_size]), ("sp",))
    B, L, N, K, H = args.batch, args.length, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(args.seed)
    # Inputs live sharded over the ring from the start: no device ever holds the whole sequence.
    sharded = NamedSharding(mesh, P(None, "sp"))
    q = jax.device_put(rng.standard_normal((B, L, N, H)).astype(np.float32), sharded)
    k, v = (jax.device_put(rng.standard_normal((B, L, K, H)).astype(np.float32), sharded) for _ in range(2))
    attend = jax.jit(
        lambda q, k, v: ring_attn.ring_attention_global(
            q, k, v, mesh=mesh, axis_name="sp", causal=True, layout=args.layout
        )
    )
    print(f"ring_attn {ring_attn.__version__} on jax {jax.__version__}: {args.ring_size} x {devices[0].device_kind}")
    print(f"causal attention, {args.layout} layout: B={B} L={L} N={N} K={K} H={H} float32, "
          f"{L // args.ring_size} tokens per device")
    compiled = attend.lower(q, k, v).compile()
    memory = compiled.memory_analysis()
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(q, k, v))
    seconds = time.perf_counter() - start
    rows = np.sort(rng.choice(L, size=min(args.rows, L), replace=False))
    expected = exact_rows(q, k, v, rows, 1.0 / np.sqrt(H))
    got = np.asarray(out)[:, rows].astype(np.float64)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    dense_gib = B * N * L * L * 4 / 2**30
    T = L // args.ring_size
    shard_mib = 4 * B * T * (2 * N * H + 2 * K * H) / 2**20  # q, out, k, v shards in float32
    print(f"forward: {seconds:.2f} s")
    print(f"max abs error on {len(rows)} sampled rows vs float64: {np.max(np.abs(got - expected)):.2e} "
          f"(relative {rel:.2e})")
    print(f"per device: {shard_mib:.1f} MiB of q/k/v/out shards + {memory.temp_size_in_bytes / 2**20:.1f} MiB "
          f"compiled temporaries; the dense score matrix alone would be {dense_gib:.1f} GiB")
    if not rel < 1e-4:
        sys.exit(f"error {rel:.2e} exceeds 1e-4")


if __name__ == "__main__":
    main()
