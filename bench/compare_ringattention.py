"""Side by side, one process: ring_attn vs the paper's own code (`ringattention` 0.1.2).

Forward+backward on a simulated 8-device CPU ring; global L=8192, B=1, N=4, H=64, float32,
causal (ours with the zigzag layout) and not. Reports the median of several runs after a
warm-up, the speed ratio, each one's compiled temp memory, and FLOP/s against a float32 matmul
ceiling measured in the same run. The two are timed in turns (ours, theirs, ours, ...) so that
the shared host's load changes hit both alike.

    python bench/compare_ringattention.py [--length 8192] [--runs 5] [--json out.json]
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
from ring_attn.cost import attention_flops  # noqa: E402


def import_peer():
    """`ringattention` 0.1.2 reads `jax.lib.xla_bridge`, which newer jax no longer exposes."""
    import jax._src.xla_bridge

    if not hasattr(jax.lib, "xla_bridge"):
        jax.lib.xla_bridge = jax._src.xla_bridge
    import ringattention

    return ringattention.ringattention_jax


def peer_fn(mesh, causal, chunk, dtype=jnp.float32):
    """The peer inside `shard_map`, as its README calls it, with query/key chunks of `chunk`,
    computing in `dtype`."""
    ringattention_jax = import_peer()
    blockwise_kwargs = dict(
        causal_block_size=1 if causal else None,
        query_chunk_size=chunk,
        key_chunk_size=chunk,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        dtype=dtype,
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=None,
        prevent_cse=True,
    )

    def attend(q, k, v):
        return ringattention_jax(q, k, v, None, None, None, "sp", True, blockwise_kwargs)

    seq = P(None, "sp")
    # Its zero-initialised accumulators are not typed as varying: it needs check_vma=False.
    return jax.shard_map(attend, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq, check_vma=False)


def ours_fn(mesh, causal):
    layout = "zigzag" if causal else "contiguous"
    return functools.partial(ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", causal=causal, layout=layout)


def train_step(fn):
    def loss(q, k, v, d_out):
        return jnp.sum(fn(q, k, v) * d_out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    B, N, H, R = 1, 4, 64, 8
    L = args.length
    mesh = Mesh(np.array(jax.devices()[:R]), ("sp",))
    rng = np.random.default_rng(0)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((B, L, N, H)), jnp.float32) for _ in range(4))
    ceiling = matmul_ceiling(args.runs)
    print(f"float32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s (2048^3, one device)")
    rows = []
    for causal in (True, False):
        flops = attention_flops(B, N, L, L, H, causal) + attention_flops(B, N, L, L, H, causal, backward=True)
        result = {"causal": causal, "L": L, "ring": R}
        names = ("ring_attn", "ringattention")
        fns = (ours_fn(mesh, causal), peer_fn(mesh, causal, L // R))
        compiled = [train_step(fn).lower(q, k, v, d_out).compile() for fn in fns]
        seconds = interleaved_median_times([(c, (q, k, v, d_out)) for c in compiled], args.runs)
        for name, c, s in zip(names, compiled, seconds):
            temp = c.memory_analysis().temp_size_in_bytes
            result[name] = {"seconds": s, "temp_bytes": temp, "gflops": flops / s / 1e9}
        result["speedup"] = result["ringattention"]["seconds"] / result["ring_attn"]["seconds"]
        result["ceiling_gflops"] = ceiling / 1e9
        rows.append(result)
    print(f"\nforward+backward, B={B} N={N} H={H} float32, global L={L}, ring of {R} simulated CPU devices\n")
    print("| causal | impl | median s | GFLOP/s | of ceiling | temp MiB | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for name in ("ring_attn", "ringattention"):
            m = r[name]
            ratio = f"{r['speedup']:.2f}x" if name == "ring_attn" else "1.00x"
            print(
                f"| {r['causal']} | {name} | {m['seconds']:.3f} | {m['gflops']:.1f} | "
                f"{m['gflops'] / r['ceiling_gflops']:.0%} | {m['temp_bytes'] / 2**20:.1f} | {ratio} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
