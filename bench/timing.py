"""Shared benchmark helpers: median timing after a warm-up, measured ceilings, compiled memory."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_time(compiled, args, runs, once_over_s=None):
    """Median wall time of `compiled(*args)` over `runs` calls, after one warm-up call.

    With `once_over_s`, a warm-up longer than that is the measurement: at tens of seconds a
    call's first-run overhead is noise, and repeating it would cost minutes.
    """
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    warm_up = time.perf_counter() - start
    if once_over_s is not None and warm_up > once_over_s:
        return warm_up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(calls, runs):
    """Median wall time of each `(compiled, args)` in `calls`, timed in turns (one call of each per
    round, after a warm-up round), so that a change in the host's load hits all of them alike."""
    for compiled, args in calls:
        jax.block_until_ready(compiled(*args))
    times = [[] for _ in calls]
    for _ in range(runs):
        for (compiled, args), record in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def matmul_ceiling(runs, n=2048, dtype=jnp.float32):
    """FLOP/s of one n^3 matmul on one device."""
    a, b = (jnp.asarray(np.random.default_rng(i).standard_normal((n, n)), dtype) for i in range(2))
    return 2 * n**3 / median_time(jax.jit(jnp.matmul).lower(a, b).compile(), (a, b), runs)


def copy_ceiling(runs, n_bytes=256 * 2**20):
    """Bytes/s read plus written by an elementwise pass over `n_bytes` of float32."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(n_bytes // 4), jnp.float32)
    return 2 * n_bytes / median_time(jax.jit(lambda x: x * 1.5).lower(x).compile(), (x,), runs)


def temp_bytes(fn, *args):
    """Compiled temporary bytes per device of `jax.jit(fn)(*args)`, without running it."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
