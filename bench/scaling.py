"""Scaling of the ring on simulated CPU devices: memory, sliding window, overlap, FLOP/s.

    python bench/scaling.py memory    # compiled temp bytes vs shard length and ring size (no runs)
    python bench/scaling.py window    # causal fwd+bwd with window L/8 vs full causal, ring of 8
    python bench/scaling.py overlap   # ring step time with and without the k/v transfer
    python bench/scaling.py flops     # achieved FLOP/s vs L (to --max-length) and ring size, the peer, one-device XLA
    python bench/scaling.py all       # all four, then the plots

Each section prints a markdown table and writes bench/results/<section>.json; `flops` and `all`
also draw bench/roofline.png and bench/scaling.png.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from timing import copy_ceiling, matmul_ceiling, median_time, temp_bytes  # noqa: E402

import ring_attn  # noqa: E402
import ring_attn.ring  # noqa: E402
from ring_attn.cost import attention_bytes, attention_flops  # noqa: E402

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results"
B, N, H = 1, 4, 64


def mesh_of(ring_size):
    return Mesh(np.array(jax.devices()[:ring_size]), ("sp",))


def inputs(L, mesh, seed=0):
    rng = np.random.default_rng(seed)
    sharded = NamedSharding(mesh, P(None, "sp"))
    return [jax.device_put(rng.standard_normal((B, L, N, H)).astype(np.float32), sharded) for _ in range(4)]


def ring(mesh, **kwargs):
    """ring_attention under shard_map on inputs already in the ring's layout (the zigzag reorder
    of `ring_attention_global` is a one-off permutation a training pipeline does in its data)."""
    seq = P(None, "sp")
    attend = functools.partial(ring_attn.ring_attention, axis_name="sp", **kwargs)
    return jax.shard_map(attend, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq)


def train_step(mesh, **kwargs):
    def loss(q, k, v, d_out):
        return jnp.sum(ring(mesh, **kwargs)(q, k, v) * d_out)

    return jax.grad(loss, argnums=(0, 1, 2))


def forward(mesh, **kwargs):
    return lambda q, k, v, d_out: ring(mesh, **kwargs)(q, k, v)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name, data):
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))


def memory():
    """Temp bytes per device of causal fwd+bwd: vs the local shard (ring of 8), vs the ring size at
    fixed L, and the longest L within a per-device budget on 1 device vs a ring of 8."""
    mesh8 = mesh_of(8)
    shard_rows = []
    for T in (1024, 2048, 4096, 8192, 16384):
        shard_rows.append((T, temp_bytes(train_step(mesh8, causal=True, layout="zigzag"), *inputs(8 * T, mesh8))))
    slope = np.polyfit(np.log([t for t, _ in shard_rows]), np.log([b for _, b in shard_rows]), 1)[0]
    L = 32768
    ring_rows = [(R, temp_bytes(train_step(mesh_of(R), causal=True, layout="zigzag"), *inputs(L, mesh_of(R))))
                 for R in (1, 2, 4, 8)]
    budget = 512 * 2**20

    def fits(R, L):
        shards = 4 * B * (L // R) * N * H * 7  # q, k, v, d_out and the three gradients, float32
        step = train_step(mesh_of(R), causal=True, layout="zigzag")
        return temp_bytes(step, *inputs(L, mesh_of(R))) + shards <= budget

    def longest(R):
        """Doubling, then halving the step: the longest L (a multiple of 1024 * R) that fits."""
        step, L = 1024 * R, 1024 * R
        while fits(R, 2 * L):
            L *= 2
        step = L // 2
        while step >= 1024 * R:
            if fits(R, L + step):
                L += step
            step //= 2
        return L

    longest_fit = {R: longest(R) for R in (1, 8)}
    print(f"\ntemp MiB per device, causal fwd+bwd, ring of 8 (B={B} N={N} H={H} float32); log-log slope {slope:.3f}\n")
    print(table(["local T", "temp MiB"], [(t, f"{b / 2**20:.1f}") for t, b in shard_rows]))
    print(f"\ntemp MiB per device at global L={L} by ring size\n")
    print(table(["ring", "temp MiB"], [(r, f"{b / 2**20:.1f}") for r, b in ring_rows]))
    print(f"\nlongest L whose fwd+bwd fits {budget / 2**20:.0f} MiB per device: "
          f"1 device {longest_fit[1]}, ring of 8 {longest_fit[8]} ({longest_fit[8] / longest_fit[1]:.1f}x)")
    save("memory", {"shard": shard_rows, "slope": slope, "ring": ring_rows, "budget": budget, "longest": longest_fit})


def window(runs):
    """At W = L/8 on a ring of 8, causal fwd+bwd should cost about the window's share."""
    L, mesh = 16384, mesh_of(8)
    args = inputs(L, mesh)
    rows = []
    for name, kwargs in (
        ("full causal, zigzag", dict(causal=True, layout="zigzag")),
        ("full causal, contiguous", dict(causal=True)),
        (f"window {L // 8}", dict(causal=True, window=L // 8)),
        (f"window {L // 64}", dict(causal=True, window=L // 64)),
    ):
        seconds = median_time(jax.jit(train_step(mesh, **kwargs)).lower(*args).compile(), args, runs)
        rows.append((name, seconds))
    full = rows[0][1]
    print(f"\ncausal fwd+bwd, ring of 8, L={L}, B={B} N={N} H={H} float32, median of {runs}\n")
    print(table(["attention", "median s", "vs full causal"], [(n, f"{s:.3f}", f"{s / full:.2f}") for n, s in rows]))
    # Keys seen per query, relative to full causal: W(1 - W/2L)/(L/2) for W = L/8 is about 0.23.
    save("window", {"L": L, "rows": rows})


def overlap(runs):
    """The ring's step time against the same computation with the k/v transfer removed."""
    L, mesh = 16384, mesh_of(8)
    args = inputs(L, mesh)
    rows = []
    for causal in (False, True):
        kwargs = dict(causal=causal, layout="zigzag" if causal else "contiguous")
        with_transfer = median_time(jax.jit(train_step(mesh, **kwargs)).lower(*args).compile(), args, runs)
        shift = ring_attn.ring.shift
        # Same compute, no collective (wrong values): a local flip stands in for the transfer, so
        # the steps stay distinct and XLA cannot hoist the attention out of the ring loop.
        ring_attn.ring.shift = lambda x, *a, **k: jax.tree.map(lambda t: jnp.flip(t, axis=1), x)
        try:
            without = median_time(jax.jit(train_step(mesh, **kwargs)).lower(*args).compile(), args, runs)
        finally:
            ring_attn.ring.shift = shift
        rows.append((causal, with_transfer, without))
    print(f"\nfwd+bwd with and without the k/v transfer, ring of 8, L={L}\n")
    print(table(["causal", "ring s", "no transfer s", "overhead"],
                [(c, f"{a:.3f}", f"{b:.3f}", f"{a / b - 1:+.1%}") for c, a, b in rows]))
    save("overlap", {"L": L, "rows": rows})


LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536)
NON_CAUSAL_UP_TO = 8192  # beyond it only causal runs: the sweep would take hours on 2 cores
DENSE_UP_TO = 8192  # one-device dense attention holds the [N, L, L] scores: 4 GiB at 16K
PEER_CHUNK = 2048  # the peer's query/key chunk (or the local shard when shorter)


def flops(runs, max_length):
    """Achieved FLOP/s of the ring forward and forward+backward against measured ceilings, with
    `ringattention` 0.1.2 on the ring of 8 and one-device XLA attention in the same run."""
    from compare_ringattention import peer_fn
    from compare_ringattention import train_step as gradients_of

    matmul, copy = matmul_ceiling(runs), copy_ceiling(runs)
    rows = []

    def measure(impl, L, R, causal, fwd, step, args):
        fwd_s = median_time(jax.jit(fwd).lower(*args).compile(), args, runs, once_over_s=10)
        all_s = median_time(jax.jit(step).lower(*args).compile(), args, runs, once_over_s=10)
        f_fwd = attention_flops(B, N, L, L, H, causal)
        f_all = f_fwd + attention_flops(B, N, L, L, H, causal, backward=True)
        intensity = f_all / (attention_bytes(B, N, N, L, L, H, dtype_bytes=4)
                             + attention_bytes(B, N, N, L, L, H, dtype_bytes=4, backward=True))
        rows.append(dict(impl=impl, L=L, ring=R, causal=causal, fwd_s=fwd_s, fwd_bwd_s=all_s,
                         fwd_gflops=f_fwd / fwd_s / 1e9, fwd_bwd_gflops=f_all / all_s / 1e9, intensity=intensity))

    for L in (L for L in LENGTHS if L <= max_length):
        for causal in (False, True) if L <= NON_CAUSAL_UP_TO else (True,):
            kwargs = dict(causal=causal, layout="zigzag" if causal else "contiguous")
            for R in (1, 2, 4, 8):
                mesh = mesh_of(R)
                args = inputs(L, mesh)
                measure("ring_attn", L, R, causal, forward(mesh, **kwargs), train_step(mesh, **kwargs), args)
            mesh = mesh_of(8)
            peer = peer_fn(mesh, causal, min(PEER_CHUNK, L // 8))
            measure("ringattention", L, 8, causal, lambda q, k, v, d, peer=peer: peer(q, k, v), gradients_of(peer),
                    inputs(L, mesh))
        print(f"L={L} done", flush=True)
    dense = []
    for L in (L for L in LENGTHS if L <= min(max_length, DENSE_UP_TO)):
        args = inputs(L, mesh_of(1))
        for causal in (False, True):
            f = jax.jit(
                lambda q, k, v, d, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="xla")
            )
            s = median_time(f.lower(*args).compile(), args, runs)
            dense.append(dict(L=L, causal=causal, fwd_s=s, fwd_gflops=attention_flops(B, N, L, L, H, causal) / s / 1e9))
    print(f"\nceilings: matmul {matmul / 1e9:.1f} GFLOP/s, copy {copy / 1e9:.1f} GB/s; B={B} N={N} H={H} float32\n")
    print(table(["impl", "L", "ring", "causal", "fwd s", "fwd GFLOP/s", "fwd+bwd s", "fwd+bwd GFLOP/s", "of ceiling"],
                [(r["impl"], r["L"], r["ring"], r["causal"], f"{r['fwd_s']:.3f}", f"{r['fwd_gflops']:.1f}",
                  f"{r['fwd_bwd_s']:.3f}", f"{r['fwd_bwd_gflops']:.1f}", f"{r['fwd_bwd_gflops'] * 1e9 / matmul:.0%}")
                 for r in rows]))
    print("\njax.nn.dot_product_attention (xla), one device, forward\n")
    print(table(["L", "causal", "fwd s", "GFLOP/s"],
                [(d["L"], d["causal"], f"{d['fwd_s']:.3f}", f"{d['fwd_gflops']:.1f}") for d in dense]))
    save("flops", {"matmul": matmul, "copy": copy, "rows": rows, "dense": dense})


def plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((RESULTS / "flops.json").read_text())
    matmul, copy = data["matmul"], data["copy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.logspace(0, 4, 100)
    ax.loglog(x, np.minimum(matmul, copy * x) / 1e9, "k-", label="ceiling (matmul, copy)")
    for R, marker in zip((1, 2, 4, 8), "os^D"):
        pts = [r for r in data["rows"] if r["impl"] == "ring_attn" and r["ring"] == R]
        ax.loglog([p["intensity"] for p in pts], [p["fwd_bwd_gflops"] for p in pts], marker, label=f"ring of {R}")
    pts = [r for r in data["rows"] if r["impl"] == "ringattention"]
    ax.loglog([p["intensity"] for p in pts], [p["fwd_bwd_gflops"] for p in pts], "kx", label="ringattention, ring of 8")
    ax.set_xlabel("FLOPs per byte (fused-kernel bytes)")
    ax.set_ylabel("GFLOP/s, fwd+bwd")
    ax.set_title("ring_attn roofline, simulated CPU devices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "roofline.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for R, marker in zip((1, 2, 4, 8), "os^D"):
        pts = [r for r in data["rows"] if r["impl"] == "ring_attn" and r["ring"] == R and r["causal"]]
        ax.loglog([p["L"] for p in pts], [p["fwd_bwd_s"] for p in pts], marker + "-", label=f"ring of {R}")
    pts = [r for r in data["rows"] if r["impl"] == "ringattention" and r["causal"]]
    ax.loglog([p["L"] for p in pts], [p["fwd_bwd_s"] for p in pts], "kx--", label="ringattention, ring of 8")
    lengths = sorted({r["L"] for r in data["rows"]})
    ax.set_xticks(lengths, [f"{L // 1024}K" for L in lengths])
    ax.minorticks_off()
    ax.set_xlabel("global sequence length L")
    ax.set_ylabel("causal fwd+bwd seconds")
    ax.set_title("time vs length (2 cores shared by all devices)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "scaling.png", dpi=120)
    print("wrote bench/roofline.png and bench/scaling.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=("memory", "window", "overlap", "flops", "plots", "all"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=65536, help="longest L of the flops sweep")
    args = parser.parse_args()
    if args.section in ("memory", "all"):
        memory()
    if args.section in ("window", "all"):
        window(args.runs)
    if args.section in ("overlap", "all"):
        overlap(args.runs)
    if args.section in ("flops", "all"):
        flops(args.runs, args.max_length)
    if args.section in ("flops", "plots", "all"):
        plots()


if __name__ == "__main__":
    main()
