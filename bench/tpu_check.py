"""The TPU check: correctness of the Mosaic TPU kernels first, then timing against splash attention.

    PYTHONPATH=. python3 bench/tpu_check.py            # on a TPU: writes $OUT/tpu_check.{json,md}
    PYTHONPATH=. python3 bench/tpu_check.py --tiny     # anywhere: tiny shapes, kernels interpreted

Correctness, against the float64 oracle computed on the host CPU (a TPU has no float64): the
attention kernels of pallas_kernels.attention_tpu (forward, dq, dk/dv) through `ring_attention`
with impl="pallas_tpu", float32 and bfloat16, with GQA, segments, causal masks and a head dim that
needs padding; the fused SwiGLU kernels of pallas_kernels.feedforward_tpu (forward and the four
gradients); the rings over every chip of the host: the ppermute ring with these kernels (zigzag,
causal, segments) and the remote-DMA ring (ring_attn.ring_remote_dma: its ring-step kernel sends
k/v from inside the kernel); and splash attention as this script calls it, since every ratio
rests on that call. Timing follows whatever the checks found (a failed check is reported and
makes the exit status non-zero), bfloat16: forward and forward+backward at L in {2K, 8K, 16K},
H in {64, 128}, causal and not, of ours ("ring_attn") beside splash attention ("splash":
jax.experimental.pallas.ops.tpu.splash_attention, q pre-scaled, tiles of 512) and XLA ("xla":
jax.nn.dot_product_attention) in the same run; the SwiGLU kernels beside XLA's SwiGLU at
LLaMA-7B widths; with two chips or more, the remote-DMA ring beside the ppermute ring. TFLOP/s by
the FlashAttention convention (`ring_attn.cost`), against the chip's spec-sheet peak
(`ring_attn.chips`) and a bfloat16 matmul ceiling measured in the same run. With --tiny off a TPU
every kernel runs in TPU interpret mode (splash included) at tiny shapes, timed once: an
interpreter's time means nothing, the run proves the check works.

`attention_programs`, `feedforward_programs` and `ring_programs` give the timed programs, so that
tests/test_tpu_check_aot.py compiles exactly these for a TPU v5p without one.
"""

import argparse
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from checking import TOLERANCE, rel_err, with_gradients, write_report  # noqa: E402
from timing import matmul_ceiling, median_time  # noqa: E402

import reference  # noqa: E402
import ring_attn  # noqa: E402
from pallas_kernels import feedforward_tpu  # noqa: E402
from ring_attn.chips import chip_for_device_kind  # noqa: E402
from ring_attn.cost import attention_flops  # noqa: E402
from ring_attn.ring_remote_dma import ring_attention_remote_dma  # noqa: E402

SPLASH_BLOCK = 512  # splash's tiles as MaxText runs it on v5p (the library's default is 128)
SEQ = P(None, "sp")


def splash_attention(q, k, v, *, causal=False, interpret=False, block=SPLASH_BLOCK):
    """Splash attention on [B, L, N, H] inputs (k/v [B, S, K, H], K dividing N): the library's
    kernel takes [N, L, H] per batch row and does not scale, so q is scaled by 1/sqrt(H) first."""
    T, N, H = q.shape[1:]
    S = k.shape[1]
    mask = splash_mask.CausalMask((T, S)) if causal else splash_mask.FullMask((T, S))
    bq, bkv = min(block, T), min(block, S)
    blocks = splash_kernel.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
    )
    kernel = splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * N), block_sizes=blocks, head_shards=1, q_seq_shards=1,
        interpret=interpret,
    )
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(H**-0.5, q.dtype)), heads_first(k), heads_first(v))
    return heads_first(out)


def swiglu_xla(x, w_gate, w_up, w_down):
    """XLA's SwiGLU on [M, D] tokens: bfloat16 matmuls accumulated in float32, as the kernel does."""
    gate = jnp.dot(x, w_gate, preferred_element_type=jnp.float32)
    up = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(w_down.dtype)
    return jnp.dot(hidden, w_down, preferred_element_type=jnp.float32).astype(x.dtype)


def interpret_params(on_tpu):
    """What the directly called Pallas TPU kernels take: None compiles for TPU."""
    return None if on_tpu else pltpu.InterpretParams()


def attention_programs(causal, on_tpu):
    """The timed attention programs by name: (forward fn(q, k, v), forward+backward fn(q, k, v,
    d_out)); k/v may have fewer heads than q (GQA)."""
    candidates = {
        "ring_attn": functools.partial(ring_attn.ring_attention, causal=causal, impl="pallas_tpu"),
        "splash": functools.partial(splash_attention, causal=causal, interpret=not on_tpu),
        "xla": functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="xla"),
    }
    return {name: (fn, with_gradients(fn)) for name, fn in candidates.items()}


def feedforward_programs(on_tpu, block_m=256):
    """The timed SwiGLU programs by name: (forward fn(x, w_gate, w_up, w_down), forward+backward
    fn(x, w_gate, w_up, w_down, dy)); x is [M, D] tokens."""
    candidates = {
        "ring_attn": functools.partial(
            feedforward_tpu.feedforward, block_m=block_m, interpret=interpret_params(on_tpu)
        ),
        "xla": swiglu_xla,
    }
    return {name: (fn, with_gradients(fn)) for name, fn in candidates.items()}


def ring_programs(mesh, causal, on_tpu):
    """The timed ring programs on global [B, L, ...] arrays sharded over `mesh`'s "sp" axis, by
    name: (forward fn(q, k, v), forward+backward fn(q, k, v, d_out)). Both rings hold contiguous
    shards (the remote-DMA ring has no zigzag); "ppermute_zigzag" is the ppermute ring's best
    causal layout."""
    ppermute = functools.partial(
        ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", causal=causal, impl="pallas_tpu",
        check_vma=on_tpu,
    )
    remote = jax.shard_map(
        functools.partial(ring_attention_remote_dma, axis_name="sp", causal=causal),
        mesh=mesh, in_specs=(SEQ,) * 3, out_specs=SEQ, check_vma=on_tpu,
    )
    candidates = {"remote_dma": remote, "ppermute": ppermute}
    if causal:
        candidates["ppermute_zigzag"] = functools.partial(ppermute, layout="zigzag")
    return {name: (fn, with_gradients(fn)) for name, fn in candidates.items()}


# --- correctness --------------------------------------------------------------------------------


def float64_on_host(fn, *arrays):
    """fn(*arrays) in float64 on the host CPU, floating inputs upcast from what the kernel saw."""
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        args = [jnp.asarray(np.asarray(a, np.float64 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype))
                for a in arrays]
        return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def random_arrays(seed, shapes, dtype, scales=None):
    rng = np.random.default_rng(seed)
    scales = scales or [1.0] * len(shapes)
    return [jnp.asarray(rng.standard_normal(s) * c, dtype) for s, c in zip(shapes, scales)]


def random_ids(seed, B, L):
    """Sorted document ids, as packing produces them."""
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 3, (B, L)), axis=1), jnp.int32)


def judged(case, names, got, expected, dtype_name):
    """One correctness row: relative errors by name, finite outputs, within tolerance."""
    errors = {name: rel_err(a, e) for name, a, e in zip(names, got, expected)}
    fwd_tol, grad_tol = TOLERANCE[dtype_name]
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
    ok = finite and errors[names[0]] <= fwd_tol and max(errors[n] for n in names[1:]) <= grad_tol
    row = dict(case, **errors, ok=ok)
    print(f"correct {'OK ' if ok else 'BAD'} {row}", flush=True)
    return row


def failed(case, error):
    """A kernel that fails to build is a failed row, not the end of the check."""
    row = dict(case, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}", ok=False)
    print(f"correct BAD {row}", flush=True)
    return row


def attention_under_check(name, causal, ids, block, on_tpu):
    """What a correctness row runs: ours ("ring_attn", the Pallas TPU kernels) or the peer the
    timing compares it with ("splash": a wrong wrapper would make every ratio meaningless)."""
    if name == "splash":
        return functools.partial(splash_attention, causal=causal, interpret=not on_tpu)
    return functools.partial(ring_attn.ring_attention, causal=causal, segment_ids=ids, impl="pallas_tpu",
                             block_sizes=ring_attn.BlockSizes(block, block))


def check_attention(cases, on_tpu):
    """One device: forward and gradients against the oracle."""
    rows = []
    for name, B, L, N, K, H, causal, segments, dtype_name, block in cases:
        case = dict(kernel="attention" if name == "ring_attn" else name, B=B, L=L, N=N, K=K, H=H, causal=causal,
                    segments=segments, dtype=dtype_name)
        q, k, v, d_out = random_arrays(L + H + N, [(B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H)],
                                       jnp.dtype(dtype_name))
        ids = random_ids(L, B, L) if segments else None
        host_ids = None if ids is None else np.asarray(ids)

        def oracle(q, k, v, causal=causal, ids=host_ids):
            return reference.attention(q, k, v, causal=causal, q_segment_ids=ids, kv_segment_ids=ids,
                                       dtype=jnp.float64)

        try:
            fn = attention_under_check(name, causal, ids, block, on_tpu)
            out, grads = jax.jit(with_gradients(fn))(q, k, v, d_out)
        except Exception as e:  # noqa: BLE001
            rows.append(failed(case, e))
            continue
        expected_out, expected_grads = float64_on_host(with_gradients(oracle), q, k, v, d_out)
        rows.append(judged(case, ("out", "dq", "dk", "dv"), (out, *grads), (expected_out, *expected_grads),
                           dtype_name))
    return rows


def check_feedforward(cases, on_tpu):
    """The fused SwiGLU kernels: forward and the gradients of x and the three weights."""
    rows = []
    for M, D, F, dtype_name, block_m, block_f in cases:
        case = dict(kernel="feedforward", M=M, D=D, F=F, block_m=block_m, block_f=block_f, dtype=dtype_name)
        shapes = [(M, D), (D, F), (D, F), (F, D), (M, D)]
        x, w_gate, w_up, w_down, dy = random_arrays(M + D + F, shapes, jnp.dtype(dtype_name),
                                                    [1.0, D**-0.5, D**-0.5, F**-0.5, 1.0])
        ours = functools.partial(feedforward_tpu.feedforward, block_m=block_m, block_f=block_f,
                                 interpret=interpret_params(on_tpu))

        def oracle(x, w_gate, w_up, w_down):
            return reference.swiglu(x[None], w_gate, w_up, w_down, dtype=jnp.float64)[0]

        try:
            out, grads = jax.jit(with_gradients(ours))(x, w_gate, w_up, w_down, dy)
        except Exception as e:  # noqa: BLE001
            rows.append(failed(case, e))
            continue
        expected_out, expected_grads = float64_on_host(with_gradients(oracle), x, w_gate, w_up, w_down, dy)
        names = ("out", "dx", "dw_gate", "dw_up", "dw_down")
        rows.append(judged(case, names, (out, *grads), (expected_out, *expected_grads), dtype_name))
    return rows


def rings_under_check(mesh, ids, blocks, on_tpu):
    """Both rings over `mesh`, causal with segment ids `ids`, by name: fn(q, k, v) on global arrays."""
    zigzag = functools.partial(
        ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", causal=True, layout="zigzag",
        impl="pallas_tpu", block_sizes=blocks, check_vma=on_tpu,
    )

    def remote_dma(q, k, v, ids):
        return ring_attention_remote_dma(q, k, v, axis_name="sp", causal=True, segment_ids=ids, block_sizes=blocks)

    remote = jax.shard_map(remote_dma, mesh=mesh, in_specs=(SEQ,) * 4, out_specs=SEQ, check_vma=on_tpu)
    return {
        "ring_ppermute_zigzag": lambda q, k, v: zigzag(q, k, v, segment_ids=ids),
        "ring_remote_dma": lambda q, k, v: remote(q, k, v, ids),
    }


def check_rings(mesh, cases, on_tpu):
    """Both rings over `mesh`'s chips, causal with segments: the ppermute ring with the Pallas TPU
    kernels (zigzag layout) and the remote-DMA ring (contiguous), forward and gradients."""
    rows = []
    R = mesh.shape["sp"]
    for T, N, K, H, dtype_name, block in cases:
        B, L = 1, R * T
        q, k, v, d_out = random_arrays(T + H, [(B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H)],
                                       jnp.dtype(dtype_name))
        ids = random_ids(T + 1, B, L)
        host_ids = np.asarray(ids)

        def oracle(q, k, v, ids=host_ids):
            return reference.attention(q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids, dtype=jnp.float64)

        expected_out, expected_grads = float64_on_host(with_gradients(oracle), q, k, v, d_out)
        sharded = NamedSharding(mesh, SEQ)
        q, k, v, d_out, ids = (jax.device_put(x, sharded) for x in (q, k, v, d_out, ids))
        rings = rings_under_check(mesh, ids, ring_attn.BlockSizes(block, block), on_tpu)
        for name, ring in rings.items():
            case = dict(kernel=name, ring=R, B=B, L=L, N=N, K=K, H=H, causal=True, segments=True, dtype=dtype_name)
            try:
                out, grads = jax.jit(with_gradients(ring))(q, k, v, d_out)
            except Exception as e:  # noqa: BLE001
                rows.append(failed(case, e))
                continue
            rows.append(judged(case, ("out", "dq", "dk", "dv"), (out, *grads), (expected_out, *expected_grads),
                               dtype_name))
    return rows


# --- timing -------------------------------------------------------------------------------------


def timed(programs, args, runs, flops):
    """Each program's forward and forward+backward time and TFLOP/s; an error is reported, not fatal."""
    results = {}
    fwd_flops, bwd_flops = flops
    for name, (fwd, fwd_bwd) in programs.items():
        try:
            t_fwd = median_time(jax.jit(fwd).lower(*args[:-1]).compile(), args[:-1], runs)
            t_all = median_time(jax.jit(fwd_bwd).lower(*args).compile(), args, runs)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is reported
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        results[name] = dict(
            fwd_s=t_fwd, fwd_bwd_s=t_all, fwd_tflops=fwd_flops / t_fwd / 1e12,
            fwd_bwd_tflops=(fwd_flops + bwd_flops) / t_all / 1e12,
            bwd_tflops=bwd_flops / max(t_all - t_fwd, 1e-9) / 1e12,
        )
    return results


def ratios(row, ours, peer):
    """Peer time / ours: above 1, ours is faster."""
    a, b = row.get(ours, {}), row.get(peer, {})
    if "fwd_s" in a and "fwd_s" in b:
        row[f"fwd_vs_{peer}"] = b["fwd_s"] / a["fwd_s"]
        row[f"fwd_bwd_vs_{peer}"] = b["fwd_bwd_s"] / a["fwd_bwd_s"]


def time_attention(lengths, head_dims, B, N, K, runs, on_tpu, masks=(False, True)):
    rows = []
    for L in lengths:
        for H in head_dims:
            q, k, v, d_out = random_arrays(L + H, [(B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H)],
                                           jnp.bfloat16)
            for causal in masks:
                flops = (attention_flops(B, N, L, L, H, causal), attention_flops(B, N, L, L, H, causal, backward=True))
                row = dict(L=L, H=H, B=B, N=N, K=K, causal=causal)
                row.update(timed(attention_programs(causal, on_tpu), (q, k, v, d_out), runs, flops))
                ratios(row, "ring_attn", "splash")
                rows.append(row)
                print(f"timed {row}", flush=True)
    return rows


def time_feedforward(shapes, runs, on_tpu):
    rows = []
    for M, D, F in shapes:
        args = random_arrays(M + D, [(M, D), (D, F), (D, F), (F, D), (M, D)], jnp.bfloat16,
                             [1.0, D**-0.5, D**-0.5, F**-0.5, 1.0])
        # Forward: three matmuls of 2·M·D·F; backward: six (dx, three weight gradients), its recompute not counted.
        flops = (6 * M * D * F, 12 * M * D * F)
        row = dict(M=M, D=D, F=F)
        row.update(timed(feedforward_programs(on_tpu), args, runs, flops))
        ratios(row, "ring_attn", "xla")
        rows.append(row)
        print(f"timed {row}", flush=True)
    return rows


def time_rings(mesh, T, N, H, runs, on_tpu):
    rows = []
    R = mesh.shape["sp"]
    B, L = 1, R * T
    sharded = NamedSharding(mesh, SEQ)
    args = [jax.device_put(x, sharded) for x in random_arrays(T, [(B, L, N, H)] * 4, jnp.bfloat16)]
    for causal in (False, True):
        flops = (attention_flops(B, N, L, L, H, causal), attention_flops(B, N, L, L, H, causal, backward=True))
        row = dict(ring=R, L=L, H=H, B=B, N=N, causal=causal)
        row.update(timed(ring_programs(mesh, causal, on_tpu), args, runs, flops))
        ratios(row, "remote_dma", "ppermute")
        rows.append(row)
        print(f"timed {row}", flush=True)
    return rows


# --- report -------------------------------------------------------------------------------------


def correctness_markdown(rows):
    lines = ["| kernel | case | dtype | errors (relative Frobenius vs float64) | ok |", "|---|---|---|---|---|"]
    for r in rows:
        shape_keys = [k for k in ("ring", "B", "L", "N", "K", "H", "M", "D", "F", "block_m", "block_f") if k in r]
        shape = " ".join(f"{k}={r[k]}" for k in shape_keys)
        if r.get("causal"):
            shape += " causal"
        if r.get("segments"):
            shape += " segments"
        names = [k for k in ("out", "dq", "dk", "dv", "dx", "dw_gate", "dw_up", "dw_down") if k in r]
        errors = r["error"] if "error" in r else " ".join(f"{n} {r[n]:.1e}" for n in names)
        lines.append(f"| {r['kernel']} | {shape} | {r['dtype']} | {errors} | {'yes' if r['ok'] else 'NO'} |")
    return lines


def timing_markdown(rows, keys, names, peak):
    columns = (*keys, "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd of peak")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        case = "| " + " | ".join(str(r[k]) for k in keys) + " "
        for name in names:
            m = r.get(name)
            if m is None:
                continue
            if "error" in m:
                lines.append(case + f"| {name} | {m['error']} | | | | |")
                continue
            of_peak = f"{m['fwd_bwd_tflops'] * 1e12 / peak:.0%}" if peak else ""
            lines.append(case + f"| {name} | {m['fwd_s'] * 1e3:.2f} | {m['fwd_tflops']:.1f} | "
                                f"{m['fwd_bwd_s'] * 1e3:.2f} | {m['fwd_bwd_tflops']:.1f} | {of_peak} |")
        for key in sorted(k for k in r if "_vs_" in k):
            lines.append(case + f"| {key} | {r[key]:.2f}x | | | | |")
    return lines


def markdown(report):
    chip = report["chip"]
    peak = chip["flops_per_s"] if chip else None
    lines = [f"# TPU check on {report['device']} (jax {report['jax']}, backend {report['backend']})", ""]
    lines += ["## Correctness", ""] + correctness_markdown(report["correctness"])
    lines += ["", f"bf16 matmul ceiling measured: {report['matmul_tflops']:.1f} TFLOP/s; spec-sheet peak: "
              + (f"{peak / 1e12:.0f} TFLOP/s ({chip['name']})" if chip else "none (not a chip in ring_attn.chips)"), ""]
    lines += ["## Attention, bfloat16 (ratio: peer time / ours)", ""]
    lines += timing_markdown(report["timing"], ("L", "H", "causal"), ("ring_attn", "splash", "xla"), peak)
    lines += ["", "## SwiGLU feedforward, bfloat16 (FLOPs: 6·M·D·F forward, 12·M·D·F backward)", ""]
    lines += timing_markdown(report["feedforward_timing"], ("M", "D", "F"), ("ring_attn", "xla"), peak)
    if report["ring_timing"]:
        ring_peak = peak * report["ring_timing"][0]["ring"] if peak else None
        lines += ["", "## Rings over every chip, bfloat16 (ratio: ppermute time / remote DMA)", ""]
        lines += timing_markdown(report["ring_timing"], ("ring", "L", "H", "causal"),
                                 ("remote_dma", "ppermute", "ppermute_zigzag"), ring_peak)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, kernels interpreted off a TPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    on_tpu = jax.default_backend() == "tpu"
    devices = jax.devices()
    if args.tiny:
        attention_cases = [("ring_attn", 1, 32, 4, 2, 64, True, True, "float32", 16),
                           ("ring_attn", 1, 32, 4, 4, 80, False, False, "bfloat16", 16),
                           ("splash", 1, 128, 2, 1, 64, True, False, "float32", None)]
        feedforward_cases = [(40, 48, 80, "float32", 16, 128)]
        ring_size, ring_cases = min(4, len(devices)), [(16, 2, 1, 32, "float32", 8)]
        attention_timing = dict(lengths=(128,), head_dims=(64,), B=1, N=2, K=1, runs=1, masks=(True,))
        feedforward_shapes, ring_timing = [(64, 128, 256)], None
        ceiling_n, runs = 256, 1
    else:
        # Tiles of 128, several a row, so that causal skipping and clamped block indices run.
        attention_cases = [
            ("ring_attn", 2, 1024, 8, 8, 64, True, False, "float32", 128),
            ("ring_attn", 2, 1024, 8, 2, 128, True, True, "float32", 128),
            ("ring_attn", 1, 2048, 16, 4, 128, True, True, "bfloat16", 128),
            ("ring_attn", 2, 1024, 8, 1, 64, False, True, "bfloat16", 128),
            ("ring_attn", 1, 512, 4, 4, 80, True, False, "bfloat16", 128),
            ("splash", 1, 2048, 16, 4, 128, True, False, "bfloat16", None),
            ("splash", 2, 1024, 8, 8, 64, False, False, "bfloat16", None),
        ]
        feedforward_cases = [(2048, 1024, 2816, "bfloat16", 256, 256), (512, 320, 640, "float32", 128, 128)]
        ring_size, ring_cases = len(devices), [(1024, 8, 2, 128, "bfloat16", 256), (512, 4, 4, 64, "float32", 128)]
        attention_timing = dict(lengths=(2048, 8192, 16384), head_dims=(64, 128), B=2, N=16, K=16, runs=args.runs)
        feedforward_shapes, ring_timing = [(8192, 4096, 11008)], dict(T=8192, N=16, H=128)
        ceiling_n, runs = 8192, args.runs
    chip = chip_for_device_kind(devices[0].device_kind)
    report = dict(device=str(devices[0].device_kind), jax=jax.__version__, backend=jax.default_backend(),
                  chip=None if chip is None else dict(name=chip.name, flops_per_s=chip.flops_per_s,
                                                      hbm_bytes_per_s=chip.hbm_bytes_per_s))
    mesh = Mesh(np.array(devices[:ring_size]), ("sp",))
    report["correctness"] = (check_attention(attention_cases, on_tpu) + check_feedforward(feedforward_cases, on_tpu)
                             + check_rings(mesh, ring_cases, on_tpu))
    report["matmul_tflops"] = matmul_ceiling(runs, ceiling_n, jnp.bfloat16) / 1e12
    report["timing"] = time_attention(on_tpu=on_tpu, **attention_timing)
    report["feedforward_timing"] = time_feedforward(feedforward_shapes, runs, on_tpu)
    # The rings are timed on chips only: interpreted, every device's grid steps run through Python.
    timed_rings = ring_timing is not None and ring_size >= 2
    report["ring_timing"] = time_rings(mesh, runs=runs, on_tpu=on_tpu, **ring_timing) if timed_rings else []
    write_report(report, args.out, "tpu_check", markdown(report))
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if all(r["ok"] for r in report["correctness"]) else 1)
