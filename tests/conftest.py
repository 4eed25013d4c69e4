"""Shared test setup: 8 simulated CPU devices, one tolerance table, one comparison, random inputs."""

import functools
import importlib.util
import os
import pathlib
import threading

# Before jax starts: a ring of up to 8 devices on the host CPU.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Tests compile many small programs, and XLA's CPU compile is most of their time: LLVM at -O1 without
# its expensive passes compiles them about a fifth faster and runs them (8K-token prefills included)
# no slower. Not where the aot extra's compilers are installed: there the tests read what XLA compiles
# for GPUs and TPUs, which these flags would change.
def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


if not (_installed("libtpu") or _installed("jax_plugins.xla_cuda13")):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from jax.experimental.pallas import triton as plgpu_triton  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import reference  # noqa: E402

# RING_ATTN_TEST_PROFILE: "ci" (the default) runs every test; "full" the larger property and grid
# suites; "compat" checks the package against another JAX version in a fraction of the time: each
# test once (its first parameter set), 3 property examples, no test marked slow (end to end
# training, the shipped models' scores, the largest rings), all of which the "ci" run covers.
PROFILE = os.environ.get("RING_ATTN_TEST_PROFILE", "ci")
if PROFILE not in ("ci", "full", "compat"):
    raise ValueError(f"RING_ATTN_TEST_PROFILE must be ci, full or compat, got {PROFILE!r}")
FULL = PROFILE == "full"
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "compat", max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("full", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(PROFILE)


# libtpu lets one process a host compile for TPU, and keeps its lock until the process exits. The
# compile tests that may load it are marked `libtpu`: the aot leg of .ci/run runs them in one process
# (-m libtpu) beside a second that runs the rest (-m "not libtpu"): those whose id names GPU targets
# only, and the GPU register tests (which share one compile of each kernel).
TPU_NAMES = ("tpu", "v4", "v5e", "v5p", "v6e")
GPU_NAMES = ("triton", "mosaic_gpu", "cuda", "h100", "h200", "a100", "b200")
COMPILE_MODULES = ("test_aot.py", "test_schedule_sweep.py", "test_plan.py", "test_tpu_check_aot.py")


def may_load_libtpu(item):
    if item.path.name not in COMPILE_MODULES:
        return False
    test_id = item.nodeid.split("::")[-1].lower()
    return not any(name in test_id for name in GPU_NAMES) or any(name in test_id for name in TPU_NAMES)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the marks added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        if may_load_libtpu(item):
            item.add_marker(pytest.mark.libtpu)
    if PROFILE != "compat":
        # The long tests first, so that no xdist worker is left alone with one at the end.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
        return
    kept, dropped, seen = [], [], set()
    for item in items:
        function = (item.path, getattr(item, "originalname", item.name))
        if item.get_closest_marker("slow") or function in seen:
            dropped.append(item)
        else:
            seen.add(function)
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

# Relative Frobenius error allowed against the float64 oracle, by input dtype.
TOLERANCE = {
    jnp.dtype(jnp.float32): {"forward": 1e-4, "gradient": 1e-3},
    jnp.dtype(jnp.bfloat16): {"forward": 2e-2, "gradient": 5e-2},
    jnp.dtype(jnp.float16): {"forward": 1e-2, "gradient": 2e-2},
}


def assert_close(actual, expected, *, dtype=None, kind="forward", name="value", floor=0.0):
    """Relative Frobenius error within TOLERANCE[dtype][kind]; the message gives max abs/rel error.
    The error is relative to max(|expected|, floor): a floor judges values that are zero by
    cancellation against the size of the terms that cancelled."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    dtype = jnp.dtype(dtype if dtype is not None else actual.dtype)
    assert np.all(np.isfinite(actual)), f"{name}: {np.sum(~np.isfinite(actual))} non-finite values"
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    tol = TOLERANCE[dtype][kind]
    diff = a - e
    rel = np.linalg.norm(diff) / max(np.linalg.norm(e), floor, 1e-30)
    max_abs = np.max(np.abs(diff)) if diff.size else 0.0
    max_rel = np.max(np.abs(diff) / (np.abs(e) + 1e-6)) if diff.size else 0.0
    assert rel <= tol, (
        f"{name} ({dtype}, {kind}): relative Frobenius error {rel:.3e} > {tol:.0e}; "
        f"max abs error {max_abs:.3e}, max rel error {max_rel:.3e}"
    )


def ring_mesh(ring_size, axis_name="sp"):
    return Mesh(np.array(jax.devices()[:ring_size]), (axis_name,))


def random_qkv(seed, B, T, N, K, H, S=None, dtype=jnp.float32, Hv=None):
    """Random q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] and d_out [B, T, N, Hv] (Hv: H when None)."""
    rng = np.random.default_rng(seed)
    S = T if S is None else S
    Hv = H if Hv is None else Hv
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, Hv))
    d_out = rng.standard_normal((B, T, N, Hv))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, d_out))


def random_segments(seed, B, L, max_segments=4):
    """Sorted document ids per row, as packing produces: several documents of random lengths."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.integers(0, max_segments, (B, L)), axis=1)
    return jnp.asarray(ids, jnp.int32)


def oracle(q, k, v, d_out, sinks=None, **kwargs):
    """float64 reference output and gradients w.r.t. q, k, v (and sinks, when given) for cotangent d_out."""
    with jax.enable_x64(True):
        q64, k64, v64, do64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        if sinks is None:
            fn = lambda q, k, v: reference.attention(q, k, v, dtype=jnp.float64, **kwargs)  # noqa: E731
            out, grads = output_and_grads(fn, q64, k64, v64, do64)
        else:
            fn = lambda q, k, v, s: reference.attention(q, k, v, sinks=s, dtype=jnp.float64, **kwargs)  # noqa: E731
            out, grads = output_and_grads(fn, q64, k64, v64, do64, sinks=jnp.asarray(np.asarray(sinks, np.float64)))
        return np.asarray(out), tuple(np.asarray(g) for g in grads)


def oracle_with_lse(q, k, v, **kwargs):
    """float64 reference (out, lse) of `reference.attention_with_lse`."""
    with jax.enable_x64(True):
        args = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        out, lse = reference.attention_with_lse(*args, dtype=jnp.float64, **kwargs)
        return np.asarray(out), np.asarray(lse)


def output_and_grads(fn, q, k, v, d_out, compiler_options=None, sinks=None):
    """fn(q, k, v[, sinks]) and its gradients for cotangent d_out, in one jitted call."""

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run(q, k, v, d_out, sinks):
        args = (q, k, v) if sinks is None else (q, k, v, sinks)
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(d_out)

    return run(q, k, v, d_out, sinks)


def assert_matches_oracle(fn, q, k, v, d_out, compiler_options=None, sinks=None, **oracle_kwargs):
    """fn(q, k, v) and its gradients against the float64 oracle given `oracle_kwargs`; with
    `sinks`, fn(q, k, v, sinks) and the sinks' gradient too."""
    out, grads = output_and_grads(fn, q, k, v, d_out, compiler_options, sinks=sinks)
    expected, expected_grads = oracle(q, k, v, d_out, sinks=sinks, **oracle_kwargs)
    assert_close(out, expected, name="out")
    assert len(grads) == len(expected_grads)
    for name, g, e in zip(("dq", "dk", "dv", "dsinks"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)
    return out, grads


def assert_gradients_match(grads, expected_grads, visible, *, dtype):
    """A kernel's float32 (dq, dk, dv) against the oracle's, given the oracle's `visible` pairs
    [B or 1, T, S] (`reference.visible_pairs`).

    Zero by masking is exact: a query row that sees no key has dq = 0, a key that no query sees
    has dk = dv = 0. Zero by cancellation is not: a row that sees a single key has a one-hot
    softmax, so dq = scale * p * (dO.v - dO.out) @ k vanishes only up to rounding. Everything
    else is within tolerance, with a floor of 1% of the three gradients' joint size, so that a
    gradient that cancels is judged against the size of the terms that cancelled.
    """
    visible = np.asarray(visible)
    row_sees = np.broadcast_to(visible.any(-1), grads[0].shape[:2])  # [B, T]
    key_seen = np.broadcast_to(visible.any(-2), grads[1].shape[:2])  # [B, S]
    joint = np.sqrt(sum(np.linalg.norm(np.asarray(e, np.float64)) ** 2 for e in expected_grads))
    for name, g, e, seen in zip(("dq", "dk", "dv"), grads, expected_grads, (row_sees, key_seen, key_seen)):
        g = np.asarray(g)
        assert g.dtype == np.float32, f"{name}: dtype {g.dtype}, the contract says float32"
        np.testing.assert_array_equal(g[~seen], 0.0, err_msg=f"{name} where nothing is visible must be exactly 0")
        assert_close(g, e, dtype=dtype, kind="gradient", name=name, floor=0.01 * joint)


def assert_kernel_matches_oracle(out, lse, grads, expected, dtype):
    """A kernel's float32 (out, lse) and (dq, dk, dv[, dsinks]) against the oracle's (out, lse,
    grads, visible): rows that see no key have out exactly 0 and lse -inf (with sinks: the sink);
    see `assert_gradients_match`."""
    expected_out, expected_lse, expected_grads, visible = expected
    assert out.dtype == lse.dtype == jnp.float32
    assert out.shape == expected_out.shape and lse.shape == expected_lse.shape
    row_sees = np.broadcast_to(np.asarray(visible).any(-1), out.shape[:2])  # [B, T]
    np.testing.assert_array_equal(np.asarray(out)[~row_sees], 0.0, err_msg="rows that see no key give out 0")
    finite = np.isfinite(expected_lse)
    np.testing.assert_array_equal(np.isneginf(lse), ~finite, err_msg="lse is -inf where the oracle's is")
    if finite.any():
        assert_close(out, expected_out, dtype=dtype, name="out")
        assert_close(np.asarray(lse)[finite], expected_lse[finite], dtype=dtype, name="lse")
    assert_gradients_match(grads[:3], expected_grads[:3], visible, dtype=dtype)
    assert len(grads) == len(expected_grads)
    if len(grads) == 4:
        assert grads[3].dtype == np.float32, f"dsinks: dtype {grads[3].dtype}, the contract says float32"
        assert_close(grads[3], expected_grads[3], dtype=dtype, kind="gradient", name="dsinks")


@functools.cache
def _kernel_oracle(*, causal, window, scale, logit_soft_cap):
    @jax.jit
    def run(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, sinks):
        masking = dict(causal=causal, window=window, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                       q_offset=q_offset, kv_offset=kv_offset)

        def fn(q, k, v, sinks):
            return reference.attention_with_lse(
                q, k, v, scale=scale, logit_soft_cap=logit_soft_cap, sinks=sinks, dtype=jnp.float64, **masking
            )

        (out, lse), vjp = jax.vjp(fn, q, k, v, sinks)
        visible = reference.visible_pairs(q.shape[1], k.shape[1], **masking)
        return out, lse, vjp((d_out, jnp.zeros_like(lse))), visible

    return run


def kernel_oracle(
    q, k, v, d_out, q_ids=None, kv_ids=None, q_offset=0, kv_offset=0, *, causal, window=None, scale=0.3,
    logit_soft_cap=None, sinks=None,
):
    """float64 (out, lse), the gradients of out for cotangent d_out (dq, dk, dv, and dsinks when
    `sinks` is given), and the visible pairs: the `expected` of `assert_kernel_matches_oracle`."""
    with jax.enable_x64(True):
        q, k, v, d_out = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        sinks = None if sinks is None else jnp.asarray(np.asarray(sinks, np.float64))
        out, lse, grads, visible = _kernel_oracle(
            causal=causal, window=window, scale=scale, logit_soft_cap=logit_soft_cap
        )(q, k, v, d_out, q_ids, kv_ids, q_offset, kv_offset, sinks)
        grads = [np.asarray(g) for g in grads if g is not None]
        return np.asarray(out), np.asarray(lse), grads, np.asarray(visible)


# Fast to compile: interpret mode's cost is XLA compiling the interpreter's loops, not running them.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")


def abstract_mesh(shape, names, platform):
    """A mesh of devices this host does not have: an H100 for "cuda" (newer JAX asks which GPU to
    lower for), the default TPU for "tpu"."""
    if platform == "cuda":
        return jax.sharding.AbstractMesh(shape, names, abstract_device=H100)
    return jax.sharding.AbstractMesh(shape, names)


def exported_module(fn, mesh, platform, args, specs):
    """The MLIR text of jitted `fn` exported for `platform`, which runs the Pallas lowering with no
    such device here. `args` are (shape, dtype) pairs or None, `specs` their PartitionSpecs over
    `mesh` (newer JAX checks them against the shard_map inside). Pallas Triton's custom call is not
    export-stable, so it is allowed explicitly."""
    structs = [
        None if a is None else jax.ShapeDtypeStruct(a[0], a[1], sharding=jax.sharding.NamedSharding(mesh, s))
        for a, s in zip(args, specs)
    ]
    triton_target = getattr(plgpu_triton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
    checks = [jax.export.DisabledSafetyCheck.custom_call(triton_target)] if platform == "cuda" else []
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*structs).mlir_module()


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) >= 8, "tests need 8 simulated CPU devices (XLA_FLAGS set in conftest)"
    return jax.devices()


@pytest.fixture(scope="module")
def mgpu_threads_compiled_once():
    """Mosaic GPU interpret mode simulates each warpgroup as a thread and, in this JAX, compiles
    each thread's program again at every grid point of every call; this compiles each once (a
    test-speed measure only: the same programs run)."""
    from jax._src.pallas.mosaic.interpret import thread_map

    original, cache, lock = thread_map._run_jaxpr, {}, threading.Lock()

    def run(jaxpr, consts, *args):
        key = (id(jaxpr), tuple((np.shape(a), np.asarray(a).dtype.name) for a in (*consts, *args)))
        with lock:
            if key not in cache:
                fn = jax.jit(lambda consts, *args: jax.core.eval_jaxpr(jaxpr, consts, *args))
                cache[key] = (jaxpr, fn.lower(consts, *args).compile())  # jaxpr kept: its id stays unique
        cache[key][1](consts, *args)

    thread_map._run_jaxpr = run
    yield
    thread_map._run_jaxpr = original


@functools.cache
def bench_script(name):
    """The module of bench/<name>.py, loaded from its file: the benchmark scripts are not a package."""
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
