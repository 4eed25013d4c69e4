"""Where the CPU path's time goes: the attention tile's own bound, and the ring's cost per FLOP.

    python bench/cpu_bound.py [--length 8192] [--runs 5] [--json bench/results/cpu_bound.json]

Three measurements, one process, float32, H = 64, 256 x 256 tiles (the CPU default):
1. The tile bound. The jnp kernel's forward and backward tile bodies (`pallas_kernels/attention_xla.py`)
   scanned over 64 tiles on one device: the matmuls alone, then the whole body (exp, row max and
   sum, the ds pass). One device runs on one core, so "GFLOP/s a core" is the most the kernel can
   do per core, loops, copies and the ring aside.
2. The ring's cost per FLOP. Causal fwd+bwd at --length on rings of 1, 2, 4 and 8 simulated devices:
   wall time, and the process's CPU time (user + system), which the host's other load does not
   inflate. GFLOP per CPU-second against the tile bound is the share lost to everything around the
   tile (relayouts, loop copies, merges, transfers).
3. The host's matmul ceiling (2048^3 float32, every core), printed beside all of it: the best
   fraction of it the kernel can reach is cores x tile bound / ceiling.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from timing import interleaved_median_times, matmul_ceiling  # noqa: E402

import ring_attn  # noqa: E402
from ring_attn.cost import attention_flops  # noqa: E402

TILE, H, TILES = 256, 64, 64


def _random(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def forward_tiles(matmuls_only):
    """The forward's kv-tile step (online softmax) over TILES key tiles, one query tile."""

    def body(carry, kv):
        kT, v = kv
        m, l, acc, q = carry
        s = q @ kT
        if matmuls_only:
            return (m, l, acc + s @ v, q), None
        m_new = jnp.maximum(m, 0.125 * s.max(-1))
        p = jnp.exp(0.125 * s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        return (m_new, alpha * l + p.sum(-1), alpha[:, None] * acc + p @ v, q), None

    def run(q, kT, v):
        init = (jnp.full((TILE,), -1e30), jnp.zeros((TILE,)), jnp.zeros((TILE, H)), q)
        return lax.scan(body, init, (kT, v))[0][2]

    return run


def backward_tiles(matmuls_only):
    """The backward's query-tile step (five matmuls, the exp and ds passes) over TILES query tiles."""

    def body(carry, xs):
        q, qT, do, doT, lse, delta = xs
        dk, dv, k, kT, v = carry
        sT, dpT = k @ qT, v @ doT
        if matmuls_only:
            pT, dsT = sT, dpT
        else:
            pT = jnp.exp(0.125 * sT - lse[None, :])
            dsT = pT * (dpT - delta[None, :])
        return (dk + dsT @ q, dv + pT @ do, k, kT, v), kT @ dsT

    def run(k, kT, v, *xs):
        zeros = jnp.zeros((TILE, H))
        return lax.scan(body, (zeros, zeros, k, kT, v), xs)

    return run


def tile_bounds(runs):
    rng = np.random.default_rng(0)
    fwd_args = (_random(rng, TILE, H), _random(rng, TILES, H, TILE), _random(rng, TILES, TILE, H))
    bwd_args = (
        _random(rng, TILE, H), _random(rng, H, TILE), _random(rng, TILE, H),
        _random(rng, TILES, TILE, H), _random(rng, TILES, H, TILE), _random(rng, TILES, TILE, H),
        _random(rng, TILES, H, TILE), _random(rng, TILES, TILE), _random(rng, TILES, TILE),
    )
    cases = [
        ("forward", "matmuls", forward_tiles(True), fwd_args, 4),
        ("forward", "whole", forward_tiles(False), fwd_args, 4),
        ("backward", "matmuls", backward_tiles(True), bwd_args, 10),
        ("backward", "whole", backward_tiles(False), bwd_args, 10),
    ]
    calls = [(jax.jit(fn).lower(*args).compile(), args) for *_, fn, args, _ in cases]
    seconds = interleaved_median_times(calls, runs)
    return [
        {"pass": p, "body": body, "us_a_tile": s / TILES * 1e6, "gflops_a_core": TILES * f * TILE * TILE * H / s / 1e9}
        for (p, body, *_, f), s in zip(cases, seconds)
    ]


def ring_costs(length, runs):
    """Causal fwd+bwd on rings of 1-8: median wall and CPU seconds a call, timed in turns."""
    B, N = 1, 4
    rng = np.random.default_rng(1)
    q, k, v, d_out = (_random(rng, B, length, N, H) for _ in range(4))
    flops = attention_flops(B, N, length, length, H, True) + attention_flops(B, N, length, length, H, True,
                                                                             backward=True)
    compiled = []
    for ring in (1, 2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:ring]), ("sp",))
        fn = functools.partial(ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", causal=True, layout="zigzag")
        grad = jax.jit(jax.grad(lambda q, k, v, d, fn=fn: jnp.sum(fn(q, k, v) * d), argnums=(0, 1, 2)))
        compiled.append(grad.lower(q, k, v, d_out).compile())
        jax.block_until_ready(compiled[-1](q, k, v, d_out))
    wall, cpu = [[] for _ in compiled], [[] for _ in compiled]
    for _ in range(runs):
        for c, w, u in zip(compiled, wall, cpu):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            jax.block_until_ready(c(q, k, v, d_out))
            w.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            u.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return [
        {"ring": ring, "flops": flops, "wall_s": statistics.median(w), "cpu_s": statistics.median(u),
         "gflop_a_cpu_second": flops / statistics.median(u) / 1e9}
        for ring, w, u in zip((1, 2, 4, 8), wall, cpu)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cores = os.cpu_count()
    ceiling = matmul_ceiling(args.runs)
    tiles = tile_bounds(args.runs)
    rings = ring_costs(args.length, args.runs)
    ceiling = max(ceiling, matmul_ceiling(args.runs))  # the better of two, before and after: a busy moment lowers it
    print(f"\nhost: {cores} cores, float32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s (2048^3, every core)\n")
    print("| tile body | us a tile | GFLOP/s a core | cores x it, of the ceiling |")
    print("|---|---|---|---|")
    for t in tiles:
        share = cores * t["gflops_a_core"] * 1e9 / ceiling
        print(f"| {t['pass']}, {t['body']} | {t['us_a_tile']:.1f} | {t['gflops_a_core']:.0f} | {share:.0%} |")
    fwd, bwd = (next(t for t in tiles if t["pass"] == p and t["body"] == "whole") for p in ("forward", "backward"))
    # fwd+bwd counts 1 + 2.5 forwards (the FlashAttention convention), so the bound is their weighted harmonic mean
    bound = 3.5 / (1 / fwd["gflops_a_core"] + 2.5 / bwd["gflops_a_core"])
    print(f"\ntile bound, fwd+bwd: {bound:.0f} GFLOP/s a core; x {cores} cores = {cores * bound * 1e9 / ceiling:.0%} "
          "of the ceiling\n")
    print(f"| ring (causal fwd+bwd, L={args.length}) | wall s | CPU s | GFLOP a CPU-second | of the tile bound | "
          "wall, of the ceiling |")
    print("|---|---|---|---|---|---|")
    for r in rings:
        print(f"| {r['ring']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['gflop_a_cpu_second']:.0f} | "
              f"{r['gflop_a_cpu_second'] / bound:.0%} | {r['flops'] / r['wall_s'] / ceiling:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            result = {"cores": cores, "ceiling_gflops": ceiling / 1e9, "tiles": tiles, "rings": rings,
                      "tile_bound_gflops_a_core": bound, "length": args.length}
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
