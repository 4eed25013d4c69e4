"""What the benchmarks' correctness checks share: the tolerances, the error they measure, a function's
forward and gradients in one call, and the report a platform check writes."""

import json
import pathlib

import jax
import numpy as np

# (forward, gradient) bounds on the relative Frobenius error against the float64 oracle.
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 5e-2)}


def rel_err(actual, expected):
    """|actual - expected| / |expected|, Frobenius norms, in float64."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def with_gradients(fn):
    """fn(*primals) -> run(*primals, cotangent) = (fn's output, its gradients w.r.t. every primal)."""

    def run(*args):
        out, vjp = jax.vjp(fn, *args[:-1])
        return out, vjp(args[-1])

    return run


def write_report(report, out_dir, name, text):
    """`report` as out_dir/name.json and `text` (its markdown) as out_dir/name.md, and printed."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(text)
    print(text)
