"""The GPU check: correctness of the Pallas GPU kernels first, then timing against cuDNN and XLA.

    PYTHONPATH=. python3 bench/gpu_check.py            # on a GPU: writes $OUT/gpu_check.{json,md}
    PYTHONPATH=. python3 bench/gpu_check.py --tiny     # anywhere: tiny shapes, kernels interpreted

Correctness: the Triton-lowered kernels (forward and backward, through `ring_attention` with
impl="pallas_triton") against the reference at the highest matmul precision, float32 and bfloat16,
with GQA, segments and causal masks; and the Mosaic GPU (Hopper) forward and backward,
impl="pallas_mgpu", on the bfloat16 cases, the only ones it takes. Timing: forward and
forward+backward at L in {2K, 8K, 16K}, H in {64, 128}, causal and not, bfloat16, of both
("ring_attn": Triton, "ring_attn_mgpu": Mosaic GPU) beside
`jax.nn.dot_product_attention` with implementation "cudnn" and "xla" in the same run; TFLOP/s by
the FlashAttention convention (forward 4·B·N·L²·H, halved when causal; backward 2.5x the forward)
and a bfloat16 matmul ceiling measured in the same run. With --tiny off a GPU the Mosaic GPU
kernel is checked at one tiny case in its interpret mode and not timed (an interpreter's time
means nothing, and costs seconds a call). Needs nothing beyond jax and this checkout.
"""

import argparse
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from checking import TOLERANCE, rel_err, write_report  # noqa: E402
from timing import median_time  # noqa: E402

import reference  # noqa: E402
import ring_attn  # noqa: E402
from ring_attn.cost import attention_flops  # noqa: E402

# Timed kernels by report name: the Triton kernels and the Mosaic GPU kernels.
TRITON, MGPU = "ring_attn", "ring_attn_mgpu"
IMPLS = {TRITON: "pallas_triton", MGPU: "pallas_mgpu"}


def random_inputs(seed, B, L, N, K, H, dtype):
    rng = np.random.default_rng(seed)
    q, d_out = (jnp.asarray(rng.standard_normal((B, L, N, H)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, L, K, H)), dtype) for _ in range(2))
    return q, k, v, d_out


def correctness(impl, cases, block):
    rows = []
    for B, L, N, K, H, causal, segments, dtype_name in cases:
        dtype = jnp.dtype(dtype_name)
        q, k, v, d_out = random_inputs(L + H, B, L, N, K, H, dtype)
        ids = None
        if segments:
            ids = jnp.asarray(np.sort(np.random.default_rng(L).integers(0, 3, (B, L)), axis=1), jnp.int32)
        ours = functools.partial(
            ring_attn.ring_attention, causal=causal, segment_ids=ids, impl=impl,
            block_sizes=ring_attn.BlockSizes(block, block),
        )
        oracle = functools.partial(reference.attention, causal=causal, q_segment_ids=ids, kv_segment_ids=ids)

        @jax.jit
        def both(q, k, v, d_out, ours=ours, oracle=oracle):
            out, vjp = jax.vjp(ours, q, k, v)
            ref, ref_vjp = jax.vjp(lambda *xs: oracle(*(x.astype(jnp.float32) for x in xs)), q, k, v)
            return (out, *vjp(d_out)), (ref, *ref_vjp(d_out.astype(jnp.float32)))

        case = dict(impl=impl, B=B, L=L, N=N, K=K, H=H, causal=causal, segments=segments, dtype=dtype_name)
        try:
            got, expected = both(q, k, v, d_out)
        except Exception as e:  # one kernel failing to build must not cost the others' results
            rows.append(dict(case, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", ok=False))
            print(f"correct BAD {rows[-1]}", flush=True)
            continue
        errors = [rel_err(a, b) for a, b in zip(got, expected)]
        fwd_tol, grad_tol = TOLERANCE[dtype_name]
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
        ok = finite and errors[0] <= fwd_tol and max(errors[1:]) <= grad_tol
        rows.append(dict(case, out=errors[0], dq=errors[1], dk=errors[2], dv=errors[3], ok=ok))
        print(f"correct {'OK ' if ok else 'BAD'} {rows[-1]}", flush=True)
    return rows


def timing(impls, lengths, head_dims, B, N, runs, on_gpu):
    rows = []
    for L in lengths:
        for H in head_dims:
            q, k, v, d_out = random_inputs(0, B, L, N, N, H, jnp.bfloat16)
            for causal in (False, True):
                fwd_flops = attention_flops(B, N, L, L, H, causal)
                candidates = {
                    name: functools.partial(ring_attn.ring_attention, causal=causal, impl=impls[name]) for name in impls
                }
                for name in ("cudnn", "xla"):
                    if name == "cudnn" and not on_gpu:
                        continue
                    candidates[name] = functools.partial(
                        jax.nn.dot_product_attention, is_causal=causal, implementation=name
                    )
                row = dict(L=L, H=H, B=B, N=N, causal=causal)
                for name, fn in candidates.items():
                    fwd = jax.jit(fn)
                    grad = jax.jit(jax.grad(
                        lambda q, k, v, d, fn=fn: jnp.sum((fn(q, k, v) * d).astype(jnp.float32)), argnums=(0, 1, 2)
                    ))
                    try:
                        t_fwd = median_time(fwd, (q, k, v), runs)
                        t_all = median_time(grad, (q, k, v, d_out), runs)
                    except Exception as e:  # a peer that cannot run this shape is reported, not fatal
                        row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                        continue
                    row[name] = dict(
                        fwd_s=t_fwd, fwd_bwd_s=t_all, fwd_tflops=fwd_flops / t_fwd / 1e12,
                        bwd_tflops=2.5 * fwd_flops / max(t_all - t_fwd, 1e-9) / 1e12,
                    )
                if "cudnn" in row and "fwd_s" in row["cudnn"] and "fwd_s" in row[TRITON]:
                    row["fwd_vs_cudnn"] = row["cudnn"]["fwd_s"] / row[TRITON]["fwd_s"]
                    ours_bwd = row[TRITON]["fwd_bwd_s"] - row[TRITON]["fwd_s"]
                    row["bwd_vs_cudnn"] = (row["cudnn"]["fwd_bwd_s"] - row["cudnn"]["fwd_s"]) / ours_bwd
                if "fwd_s" in row.get(MGPU, {}):
                    if "fwd_s" in row[TRITON]:
                        row["mgpu_fwd_vs_triton"] = row[TRITON]["fwd_s"] / row[MGPU]["fwd_s"]
                        mgpu_bwd = row[MGPU]["fwd_bwd_s"] - row[MGPU]["fwd_s"]
                        row["mgpu_bwd_vs_triton"] = (row[TRITON]["fwd_bwd_s"] - row[TRITON]["fwd_s"]) / mgpu_bwd
                    if "fwd_s" in row.get("cudnn", {}):
                        row["mgpu_fwd_vs_cudnn"] = row["cudnn"]["fwd_s"] / row[MGPU]["fwd_s"]
                rows.append(row)
                print(f"timed {row}", flush=True)
    return rows


def matmul_ceiling(n, runs):
    a, b = (jnp.asarray(np.random.default_rng(i).standard_normal((n, n)), jnp.bfloat16) for i in range(2))
    return 2 * n**3 / median_time(jax.jit(jnp.matmul), (a, b), runs)


def markdown(report):
    lines = [f"# GPU check on {report['device']} (jax {report['jax']})", ""]
    lines += ["## Correctness (relative Frobenius error vs reference)", "",
              "| impl | B | L | N:K | H | causal | segments | dtype | out | dq | dk | dv | ok |", "|" + "---|" * 13]
    for r in report["correctness"]:
        case = (f"| {r['impl']} | {r['B']} | {r['L']} | {r['N']}:{r['K']} | {r['H']} | {r['causal']} "
                f"| {r['segments']} | {r['dtype']} ")
        if "error" in r:
            lines.append(case + f"| {r['error']} | | | | NO |")
        else:
            lines.append(case + f"| {r['out']:.1e} | {r['dq']:.1e} | {r['dk']:.1e} | {r['dv']:.1e} "
                                f"| {'yes' if r['ok'] else 'NO'} |")
    lines += ["", f"bf16 matmul ceiling: {report['matmul_tflops']:.1f} TFLOP/s", "",
              "## Timing, bfloat16 (TFLOP/s; ratio = cuDNN (or Triton) time / ours)", "",
              "| L | H | causal | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | bwd TFLOP/s |", "|" + "---|" * 8]
    for r in report["timing"]:
        for name in (TRITON, MGPU, "cudnn", "xla"):
            m = r.get(name)
            if m is None:
                continue
            if "error" in m:
                lines.append(f"| {r['L']} | {r['H']} | {r['causal']} | {name} | {m['error']} | | | |")
                continue
            lines.append(f"| {r['L']} | {r['H']} | {r['causal']} | {name} | {m['fwd_s'] * 1e3:.2f} "
                         f"| {m['fwd_tflops']:.1f} | {m['fwd_bwd_s'] * 1e3:.2f} | {m['bwd_tflops']:.1f} |")
        if "fwd_vs_cudnn" in r:
            lines.append(f"| | | | ours vs cuDNN | fwd {r['fwd_vs_cudnn']:.2f}x | | bwd {r['bwd_vs_cudnn']:.2f}x | |")
        if "mgpu_fwd_vs_triton" in r:
            vs_cudnn = f" (vs cuDNN {r['mgpu_fwd_vs_cudnn']:.2f}x)" if "mgpu_fwd_vs_cudnn" in r else ""
            lines.append(f"| | | | Mosaic GPU vs Triton | fwd {r['mgpu_fwd_vs_triton']:.2f}x{vs_cudnn} | "
                         f"| bwd {r['mgpu_bwd_vs_triton']:.2f}x | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, kernels interpreted off a GPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if args.tiny:
        cases = [(1, 32, 4, 2, 64, True, True, "float32"), (1, 32, 4, 4, 80, False, False, "bfloat16")]
        # Interpreted off a GPU, one query tile of one head: a single simulated thread block.
        mgpu_cases = [(1, 64, 1, 1, 64, True, True, "bfloat16")]
        report_timing = dict(lengths=(64,), head_dims=(64,), B=1, N=2, runs=1)
        block, mgpu_block, ceiling_n = 16, 64, 256
    else:
        cases = [
            (2, 1024, 8, 8, 64, True, False, "float32"),
            (2, 1024, 8, 2, 128, True, True, "float32"),
            (1, 2048, 16, 4, 128, True, True, "bfloat16"),
            (2, 1024, 8, 1, 64, False, True, "bfloat16"),
            (1, 512, 4, 4, 80, True, False, "bfloat16"),
        ]
        mgpu_cases = [case for case in cases if case[-1] == "bfloat16"]  # wgmma takes 16-bit inputs
        report_timing = dict(lengths=(2048, 8192, 16384), head_dims=(64, 128), B=2, N=16, runs=args.runs)
        block, mgpu_block, ceiling_n = 128, 128, 8192
    report = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, backend=jax.default_backend())
    report["correctness"] = correctness(IMPLS[TRITON], cases, block) + correctness(IMPLS[MGPU], mgpu_cases, mgpu_block)
    report["matmul_tflops"] = matmul_ceiling(ceiling_n, report_timing["runs"]) / 1e12
    timed = IMPLS if on_gpu else {TRITON: IMPLS[TRITON]}
    report["timing"] = timing(timed, on_gpu=on_gpu, **report_timing)
    write_report(report, args.out, "gpu_check", markdown(report))
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if all(r["ok"] for r in report["correctness"]) else 1)
