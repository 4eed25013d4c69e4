"""bfloat16 error of ring attention against the float64 oracle, as the ring grows.

The same bfloat16 inputs (q, k, v, d_out: the float64 oracle sees exactly these values) run
through `ring_attention_global` on rings of 1 to 32 simulated CPU devices, causal, zigzag, GQA;
the relative Frobenius error of out, dq, dk and dv against float64 attention is reported per ring
size, with `ringattention` 0.1.2 (the paper's code, installed by the `[bench]` extra) on the same
inputs for rings up to 8 beside it when it is installed. Partials and the travelling dk/dv stay in
float32 here, so the error should not grow with the ring.

    python bench/numerics.py [--length 4096] [--ring-sizes 1 2 4 8 16 32] [--json out.json] [--plot out.png]
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=32"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `reference` is not installed

import reference  # noqa: E402
import ring_attn  # noqa: E402

NAMES = ("out", "dq", "dk", "dv")


def inputs(L, *, B=1, N=8, K=2, H=64, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H))
    return [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in shapes]


def oracle(q, k, v, d_out):
    """float64 out and gradients of the bfloat16 inputs' exact values."""
    with jax.enable_x64(True):
        q, k, v, d_out = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        out, vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, causal=True, dtype=jnp.float64), q, k, v)
        return [np.asarray(x) for x in (out, *vjp(d_out))]


def relative_errors(results, expected):
    return {
        name: float(np.linalg.norm(np.asarray(r, np.float64) - e) / np.linalg.norm(e))
        for name, r, e in zip(NAMES, results, expected)
    }


def run_and_grad(fn, q, k, v, d_out):
    @jax.jit
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))

    return run(q, k, v, d_out)


def ours(ring_size):
    mesh = Mesh(np.array(jax.devices()[:ring_size]), ("sp",))
    return functools.partial(ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", causal=True, layout="zigzag")


def peer(ring_size, chunk, groups):
    """`ringattention` 0.1.2 on the same ring (contiguous, its layout), computing in bfloat16 as
    ring_attn does (its float32 mode would upcast the inputs), or None if it is not installed.
    It has no grouped-query attention: k, v are repeated to the query heads (their gradients sum
    back through the repeat)."""
    from compare_ringattention import peer_fn

    try:
        attend = peer_fn(Mesh(np.array(jax.devices()[:ring_size]), ("sp",)), True, chunk, dtype=jnp.bfloat16)
    except ImportError:
        return None
    return lambda q, k, v: attend(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2))


def ring_errors(length, ring_sizes, *, with_peer=True):
    """Per ring size, the relative errors of ours (and the peer's, rings up to 8)."""
    q, k, v, d_out = inputs(length)
    expected = oracle(q, k, v, d_out)
    rows = []
    for R in ring_sizes:
        row = dict(ring_size=R, ours=relative_errors(run_and_grad(ours(R), q, k, v, d_out), expected))
        groups = q.shape[2] // k.shape[2]
        peer_attend = peer(R, min(512, length // R), groups) if with_peer and R <= 8 else None
        if peer_attend is not None:
            row["ringattention"] = relative_errors(run_and_grad(peer_attend, q, k, v, d_out), expected)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["ring_size"] for r in rows]
    for name, marker in zip(NAMES, "osD^"):
        ax.plot(sizes, [r["ours"][name] for r in rows], marker=marker, label=f"ring_attn {name}")
        peer_rows = [r for r in rows if "ringattention" in r]
        if peer_rows:
            ax.plot([r["ring_size"] for r in peer_rows], [r["ringattention"][name] for r in peer_rows],
                    marker=marker, linestyle="--", label=f"ringattention {name}")
    ax.set(xscale="log", yscale="log", xlabel="ring size", ylabel="relative error vs float64",
           title="bfloat16 inputs: error as the ring grows")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--ring-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--no-peer", action="store_true", help="skip ringattention 0.1.2")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    rows = ring_errors(args.length, args.ring_sizes, with_peer=not args.no_peer)
    print(f"\nbfloat16, causal, L={args.length}, B=1 N=8 K=2 H=64: relative Frobenius error against float64\n")
    print("| ring size | impl | out | dq | dk | dv |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for impl in ("ours", "ringattention"):
            if impl in r:
                label = "ring_attn (zigzag)" if impl == "ours" else "ringattention 0.1.2"
                print(f"| {r['ring_size']} | {label} | " + " | ".join(f"{r[impl][n]:.2e}" for n in NAMES) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"length": args.length, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
