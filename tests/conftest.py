"""Shared test setup: 8 simulated CPU devices, one tolerance table, one comparison, random inputs."""

import functools
import os

# Before jax starts: a ring of up to 8 devices on the host CPU.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import reference  # noqa: E402

# RING_ATTN_TEST_PROFILE=full runs the larger property and grid suites.
FULL = os.environ.get("RING_ATTN_TEST_PROFILE", "ci") == "full"
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("full", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("full" if FULL else "ci")

# Relative Frobenius error allowed against the float64 oracle, by input dtype.
TOLERANCE = {
    jnp.dtype(jnp.float32): {"forward": 1e-4, "gradient": 1e-3},
    jnp.dtype(jnp.bfloat16): {"forward": 2e-2, "gradient": 5e-2},
}


def assert_close(actual, expected, *, dtype=None, kind="forward", name="value"):
    """Relative Frobenius error within TOLERANCE[dtype][kind]; the message gives max abs/rel error."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    dtype = jnp.dtype(dtype if dtype is not None else actual.dtype)
    assert np.all(np.isfinite(actual)), f"{name}: {np.sum(~np.isfinite(actual))} non-finite values"
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    tol = TOLERANCE[dtype][kind]
    diff = a - e
    rel = np.linalg.norm(diff) / max(np.linalg.norm(e), 1e-30)
    max_abs = np.max(np.abs(diff)) if diff.size else 0.0
    max_rel = np.max(np.abs(diff) / (np.abs(e) + 1e-6)) if diff.size else 0.0
    assert rel <= tol, (
        f"{name} ({dtype}, {kind}): relative Frobenius error {rel:.3e} > {tol:.0e}; "
        f"max abs error {max_abs:.3e}, max rel error {max_rel:.3e}"
    )


def ring_mesh(ring_size, axis_name="sp"):
    return Mesh(np.array(jax.devices()[:ring_size]), (axis_name,))


def random_qkv(seed, B, T, N, K, H, S=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    S = T if S is None else S
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, H))
    d_out = rng.standard_normal((B, T, N, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, d_out))


def random_segments(seed, B, L, max_segments=4):
    """Sorted document ids per row, as packing produces: several documents of random lengths."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.integers(0, max_segments, (B, L)), axis=1)
    return jnp.asarray(ids, jnp.int32)


def oracle(q, k, v, d_out, **kwargs):
    """float64 reference output and gradients w.r.t. q, k, v for cotangent d_out."""
    with jax.enable_x64(True):
        q64, k64, v64, do64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out))
        out, grads = output_and_grads(
            lambda q, k, v: reference.attention(q, k, v, dtype=jnp.float64, **kwargs), q64, k64, v64, do64
        )
        return np.asarray(out), tuple(np.asarray(g) for g in grads)


def oracle_with_lse(q, k, v, **kwargs):
    """float64 reference (out, lse) of `reference.attention_with_lse`."""
    with jax.enable_x64(True):
        args = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        out, lse = reference.attention_with_lse(*args, dtype=jnp.float64, **kwargs)
        return np.asarray(out), np.asarray(lse)


def output_and_grads(fn, q, k, v, d_out, compiler_options=None):
    """fn(q, k, v) and its gradients for cotangent d_out, in one jitted call."""

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    return run(q, k, v, d_out)


def assert_matches_oracle(fn, q, k, v, d_out, compiler_options=None, **oracle_kwargs):
    """fn(q, k, v) and its gradients against the float64 oracle given `oracle_kwargs`."""
    out, grads = output_and_grads(fn, q, k, v, d_out, compiler_options)
    expected, expected_grads = oracle(q, k, v, d_out, **oracle_kwargs)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)
    return out, grads


def assert_kernel_matches_oracle(out, lse, grads, expected, dtype):
    """A kernel's float32 (out, lse) and (dq, dk, dv) against the oracle's (out, lse, grads):
    rows that see no key have lse -inf and out 0, and gradients with nothing visible are 0."""
    expected_out, expected_lse, expected_grads = expected
    assert out.dtype == lse.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
    assert out.shape == expected_out.shape and lse.shape == expected_lse.shape
    seen = np.isfinite(expected_lse)
    np.testing.assert_array_equal(np.isneginf(lse), ~seen, err_msg="rows that see no key have lse -inf")
    np.testing.assert_array_equal(np.asarray(out)[np.swapaxes(~seen, 1, 2)], 0.0, err_msg="and out 0")
    if seen.any():
        assert_close(out, expected_out, dtype=dtype, name="out")
        assert_close(np.asarray(lse)[seen], expected_lse[seen], dtype=dtype, name="lse")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        if np.linalg.norm(e) == 0:  # nothing visible: exactly zero
            np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=name)
        else:
            assert_close(g, e, dtype=dtype, kind="gradient", name=name)


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) >= 8, "tests need 8 simulated CPU devices (XLA_FLAGS set in conftest)"
    return jax.devices()
