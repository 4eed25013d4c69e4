"""The roofline benchmark suite's machinery: profiles and ladders, peaks, the oracle check before
any timing, the timed programs, and the closing table.

    python -m pytest bench --benchmark-json out.json           # the default ladder of this platform
    python -m pytest bench -q -p no:cacheprovider --benchmark-disable --bench-profile smoke   # CI
    python -m pytest bench -q --benchmark-disable --bench-profile smoke --bench-platform tpu  # TPU path, interpreted

Not collected by the default `python -m pytest` (testpaths is tests/). See test_attention_bench.py
for what is timed, bench/roofline.py for the plot.
"""

import os

# Before jax starts: the ring runs on 8 simulated devices when the backend is the CPU.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import roofline  # noqa: E402
from checking import TOLERANCE, rel_err, with_gradients  # noqa: E402
from timing import copy_ceiling, matmul_ceiling  # noqa: E402

import reference  # noqa: E402
from ring_attn.chips import chip_for_device_kind  # noqa: E402
from ring_attn.cost import attention_bytes, attention_flops  # noqa: E402

PROFILES = ("smoke", "default", "full")
MODES = ("fwd", "bwd", "fwd+bwd")
SEQ = P(None, "sp")


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: B rows of L tokens (global L for a ring), N query heads over K
    key/value heads of width H."""

    B: int
    L: int
    N: int
    K: int
    H: int
    causal: bool

    @property
    def id(self):
        return f"B{self.B}-L{self.L}-H{self.H}-N{self.N}K{self.K}-{'causal' if self.causal else 'full'}"


def flash_case(L, H, causal, group=1):
    """FlashAttention's benchmark shape: 16K tokens a batch, 2048 wide (N·H), GQA by `group`."""
    N = 2048 // H
    return Case(max(1, 16384 // L), L, N, N // group, H, causal)


def cpu_case(L, H, causal, N=4, K=4):
    """bench/RESULTS.md's CPU shape: one row, 4 heads."""
    return Case(1, L, N, K, H, causal)


BOTH = (False, True)
# Ladders by (platform kind, profile): kernel cases (one device) and ring cases, each a Case (global
# L) or, on accelerators, whose chip count is known only at run time, (tokens a chip, H, causal).
LADDERS = {
    ("cpu", "smoke"): dict(kernel=[cpu_case(256, 64, c) for c in BOTH] + [cpu_case(256, 64, True, K=2)],
                           ring=[cpu_case(512, 64, True)]),
    ("cpu", "default"): dict(
        kernel=[cpu_case(L, 64, c) for L in (1024, 2048, 4096) for c in BOTH]
        + [cpu_case(2048, 128, True), cpu_case(2048, 64, True, N=8, K=2)],
        ring=[cpu_case(8192, 64, True), cpu_case(8192, 64, False)],  # the CPU headline: 8K causal on 8
    ),
    ("cpu", "full"): dict(
        kernel=[cpu_case(L, H, c) for L in (1024, 2048, 4096, 8192) for H in (64, 128) for c in BOTH]
        + [cpu_case(4096, 64, True, N=8, K=2)],
        ring=[cpu_case(L, 64, True) for L in (8192, 16384, 32768)] + [cpu_case(L, 64, False) for L in (8192, 16384)]
        + [cpu_case(8192, 128, True)],
    ),
    ("accelerator", "smoke"): dict(kernel=[flash_case(1024, 128, c) for c in BOTH] + [flash_case(1024, 128, True, 4)],
                                   ring=[(1024, 128, True)]),
    ("accelerator", "default"): dict(
        kernel=[flash_case(L, H, c) for L in (2048, 8192, 16384) for H in (64, 128) for c in BOTH]
        + [flash_case(8192, 128, True, 4)],
        ring=[(8192, 128, c) for c in BOTH],
    ),
    ("accelerator", "full"): dict(
        kernel=[flash_case(L, H, c) for L in (1024, 2048, 4096, 8192, 16384, 32768) for H in (64, 128) for c in BOTH]
        + [flash_case(L, 128, True, 4) for L in (8192, 32768)],
        ring=[(T, H, c) for T in (4096, 16384) for H in (64, 128) for c in BOTH],
    ),
    # Another platform's kernels interpreted on this backend: tiny, and meant to prove the path runs.
    ("interpreted", "smoke"): dict(kernel=[Case(1, 128, 2, 1, 64, True), Case(1, 128, 2, 2, 64, False)],
                                   ring=[Case(1, 128, 2, 1, 64, True)]),
}


@dataclasses.dataclass(frozen=True)
class Platform:
    """Whose kernels run (`kind`: cpu, gpu, tpu) on which backend, and how."""

    kind: str
    backend: str
    profile: str

    @property
    def interpreted(self):
        """Another platform's Pallas kernels, in interpret mode on this backend."""
        return self.kind in ("gpu", "tpu") and self.kind != self.backend

    @property
    def dtype(self):
        # CPUs compute float32 (bfloat16 is emulated there); the chips' peaks are bfloat16.
        return jnp.float32 if self.kind == "cpu" else jnp.bfloat16

    @property
    def ring_size(self):
        count = len(jax.devices())
        return min(4 if self.interpreted else 8, count) if self.backend == "cpu" else count

    @property
    def ladder(self):
        key = "interpreted" if self.interpreted else ("cpu" if self.kind == "cpu" else "accelerator")
        ladder = LADDERS[(key, self.profile)]
        ring = [c if isinstance(c, Case) else flash_ring_case(self.ring_size, *c) for c in ladder["ring"]]
        return ladder["kernel"], ring

    def check_length(self, ring):
        """The sequence of the oracle check: short, the same configuration otherwise."""
        if self.interpreted:
            return None  # the case is already tiny
        per_device = 32 if self.kind == "cpu" else 256
        return self.ring_size * per_device if ring else (128 if self.kind == "cpu" else 512)


def flash_ring_case(ring_size, per_device, H, causal):
    """A ring case on accelerators: `per_device` tokens a chip, one row, 2048 wide."""
    return Case(1, ring_size * per_device, 2048 // H, 2048 // H, H, causal)


def pytest_addoption(parser):
    group = parser.getgroup("ring_attn roofline benchmarks")
    group.addoption("--bench-profile", choices=PROFILES, default=os.environ.get("RING_ATTN_BENCH_PROFILE", "default"),
                    help="smoke: tiny shapes (CI); default: this platform's ladder; full: the long ladder")
    group.addoption("--bench-platform", choices=("auto", "cpu", "gpu", "tpu"), default="auto",
                    help="whose kernels and reference run (auto: the backend's); another platform's kernels run "
                         "interpreted, at the smoke profile only")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds of each benchmark (default: by time)")


def pytest_configure(config):
    backend = jax.default_backend()
    chosen = config.getoption("--bench-platform")
    platform = Platform(backend if chosen == "auto" else chosen, backend, config.getoption("--bench-profile"))
    if platform.interpreted and platform.profile != "smoke":
        raise pytest.UsageError(
            f"--bench-platform {platform.kind} on a {backend} backend interprets the kernels, which times nothing "
            "meaningful: use --bench-profile smoke"
        )
    config.stash[PLATFORM] = platform
    config.stash[RESULTS] = []
    config.stash[PEAKS] = None


PLATFORM, RESULTS, PEAKS = pytest.StashKey(), pytest.StashKey(), pytest.StashKey()


def pytest_generate_tests(metafunc):
    platform = metafunc.config.stash[PLATFORM]
    kernel_cases, ring_cases = platform.ladder
    if "kernel_case" in metafunc.fixturenames:
        candidates = metafunc.module.candidates(platform)
        params = [(name, case) for case in kernel_cases for name in candidates]
        metafunc.parametrize("kernel_case", params, ids=[f"{name}-{case.id}" for name, case in params])
    if "ring_case" in metafunc.fixturenames:
        families = metafunc.module.ring_families(platform)
        params = [(name, case) for case in ring_cases for name in families]
        metafunc.parametrize("ring_case", params, ids=[f"{name}-{case.id}" for name, case in params])


# --- peaks ---------------------------------------------------------------------------------------


def measured_peaks(platform):
    """This device's ceilings, measured now: a square matmul in the suite's dtype and an
    elementwise pass (read + write), each the best of three medians (a shared host's load only
    ever lowers them)."""
    on_cpu = platform.backend == "cpu"
    n, runs = (2048, 3) if on_cpu else (8192, 10)
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    flops = max(matmul_ceiling(runs, n=n, dtype=dtype) for _ in range(3))
    bandwidth = max(copy_ceiling(runs, n_bytes=(256 if on_cpu else 2048) * 2**20) for _ in range(3))
    source = (f"measured in this run, best at its start and end: {jnp.dtype(dtype).name} {n}^3 matmul, "
              "elementwise copy")
    return dict(flops_per_s=flops, bytes_per_s=bandwidth, source=source, chip=None)


def platform_peaks(platform):
    device_kind = jax.devices()[0].device_kind
    chip = None if platform.interpreted else chip_for_device_kind(device_kind)
    if chip is None:
        peaks = measured_peaks(platform)
    else:
        peaks = dict(flops_per_s=chip.flops_per_s, bytes_per_s=chip.hbm_bytes_per_s, chip=chip.name,
                     source=f"spec sheet: {chip.name}, dense bf16")
    return dict(peaks, device_kind=device_kind, backend=platform.backend, kernels=platform.kind,
                profile=platform.profile, jax=jax.__version__)


@pytest.fixture(scope="session")
def peaks(request):
    """Peak FLOP/s and bytes/s of one device (None when timing is disabled)."""
    config = request.config
    if config.getoption("benchmark_disable", False) and config.stash[PEAKS] is None:
        return None
    if config.stash[PEAKS] is None:
        config.stash[PEAKS] = platform_peaks(config.stash[PLATFORM])
    return config.stash[PEAKS]


@pytest.fixture(scope="session")
def platform(request):
    return request.config.stash[PLATFORM]


# --- inputs and the oracle ----------------------------------------------------------------------


def random_inputs(case, dtype, seed=0):
    """Fresh normal q, k, v and an output cotangent."""
    rng = np.random.default_rng([seed, case.L, case.H, case.N, case.K])
    shapes = [(case.B, case.L, case.N, case.H), (case.B, case.L, case.K, case.H), (case.B, case.L, case.K, case.H),
              (case.B, case.L, case.N, case.H)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def oracle(q, k, v, d_out, causal):
    """float64 out and gradients on the host CPU (a TPU has no float64), inputs upcast as given."""
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS left the CPU out: the default device then (a GPU has float64)
        host = None
    with jax.enable_x64(True), jax.default_device(host):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out)]
        attend = lambda q, k, v: reference.attention(q, k, v, causal=causal, dtype=jnp.float64)  # noqa: E731
        out, grads = jax.jit(with_gradients(attend))(*args)
        return np.asarray(out), [np.asarray(g) for g in grads]


def against(peaks, info):
    """The roofline figures of a timed benchmark's `info` against `peaks` (× the chips it spans)."""
    peak_flops, peak_bytes = peaks["flops_per_s"] * info["chips"], peaks["bytes_per_s"] * info["chips"]
    return dict(roofline.rates(info["flops"], info["bytes"], info["median_s"], peak_flops, peak_bytes),
                peak_flops=peak_flops, peak_bytes_per_s=peak_bytes)


class Bench:
    """What each benchmark does: check its function against the oracle, then time one mode of
    it and record FLOPs, bytes and their rates against the peaks."""

    def __init__(self, config, peaks):
        self.config, self.platform, self.peaks = config, config.stash[PLATFORM], peaks
        self.checked = {}
        self.last_inputs = (None, None)  # the modes and candidates of a case follow each other

    def mesh(self, ring_size):
        return Mesh(np.array(jax.devices()[:ring_size]), ("sp",))

    def inputs(self, case, mesh=None):
        """The timed inputs of `case`, sharded over `mesh`'s "sp" axis when given."""
        if self.last_inputs[0] != (case, mesh):
            self.last_inputs = (None, None)  # free the previous case's arrays first
            arrays = random_inputs(case, self.platform.dtype)
            if mesh is not None:
                arrays = [jax.device_put(x, NamedSharding(mesh, SEQ)) for x in arrays]
            self.last_inputs = ((case, mesh), arrays)
        return self.last_inputs[1]

    def check(self, name, case, fn, *, mesh=None, layout=None):
        """Fail unless `fn` (the function about to be timed) matches the float64 oracle, forward
        and gradients, on short random inputs of the same configuration. `layout`: a pair
        (to_layout, from_layout) of global reorders when fn takes its inputs in another order
        (the zigzag ring). Once per function and configuration."""
        length = self.platform.check_length(ring=mesh is not None)
        small = case if length is None else dataclasses.replace(case, B=1, L=min(length, case.L))
        key = (name, small)
        if key not in self.checked:
            q, k, v, d_out = random_inputs(small, self.platform.dtype, seed=1)
            expected_out, expected_grads = oracle(q, k, v, d_out, case.causal)
            to_layout, from_layout = layout or (lambda x: x, lambda x: x)
            args = [to_layout(x) for x in (q, k, v, d_out)]
            if mesh is not None:
                args = [jax.device_put(x, NamedSharding(mesh, SEQ)) for x in args]
            out, grads = jax.jit(with_gradients(fn), compiler_options=self.compiler_options)(*args)
            got = [from_layout(x) for x in (out, *grads)]
            errors = {what: rel_err(a, e) for what, a, e in zip(("out", "dq", "dk", "dv"), got,
                                                                 (expected_out, *expected_grads))}
            finite = all(bool(np.all(np.isfinite(np.asarray(x, np.float32)))) for x in got)
            self.checked[key] = (finite, errors)
        finite, errors = self.checked[key]
        fwd_tol, grad_tol = TOLERANCE[jnp.dtype(self.platform.dtype).name]
        if not finite or errors["out"] > fwd_tol or max(errors["dq"], errors["dk"], errors["dv"]) > grad_tol:
            pytest.fail(f"{name} at {small.id} does not match the float64 oracle: relative errors {errors}, "
                        f"finite {finite}, tolerance {fwd_tol} forward, {grad_tol} gradients; not timed",
                        pytrace=False)
        return errors

    @property
    def compiler_options(self):
        # Interpreted kernels cost XLA's compile of the interpreter's loops, not their running.
        return {"xla_backend_optimization_level": 0} if self.platform.interpreted else None

    def program(self, fn, mode, q, k, v, d_out):
        """The compiled program of one mode and its arguments. "bwd" times the backward alone,
        from the forward's residuals (the VJP closure is a pytree of arrays, so jit takes it)."""
        options = self.compiler_options
        if mode == "fwd":
            return jax.jit(fn).lower(q, k, v).compile(options), (q, k, v)
        if mode == "bwd":
            _, vjp = jax.vjp(jax.jit(fn), q, k, v)
            backward = jax.jit(lambda vjp, d_out: vjp(d_out))
            return backward.lower(vjp, d_out).compile(options), (vjp, d_out)
        return jax.jit(with_gradients(fn)).lower(q, k, v, d_out).compile(options), (q, k, v, d_out)

    def rounds(self, seconds_per_call):
        """Enough rounds to fill a few seconds (a fraction of one on accelerators), within bounds."""
        if self.config.getoption("--bench-rounds"):
            return self.config.getoption("--bench-rounds")
        budget, least, most = (3.0, 3, 20) if self.platform.backend == "cpu" else (1.0, 10, 200)
        return int(min(most, max(least, math.ceil(budget / max(seconds_per_call, 1e-6)))))

    def run(self, benchmark, name, case, mode, fn, args, *, errors, ring_size=1, local_fn=None):
        """Time one mode of `fn` with pytest-benchmark and record the roofline figures in
        `benchmark.extra_info` (and the closing table). `local_fn`: one ring step's kernel call
        on each device's own shard with no transfer, timed in turns with the ring, for the ring's
        efficiency (R × its time over the ring's)."""
        benchmark.group = f"{case.id} {mode}"
        program, call_args = self.program(fn, mode, *args)
        run_once = lambda: jax.block_until_ready(program(*call_args))  # noqa: E731
        flops = attention_flops(case.B, case.N, case.L, case.L, case.H, case.causal, backward=mode == "bwd")
        moved = attention_bytes(case.B, case.N, case.K, case.L, case.L, case.H,
                                dtype_bytes=jnp.dtype(self.platform.dtype).itemsize, backward=mode == "bwd")
        if mode == "fwd+bwd":
            flops += attention_flops(case.B, case.N, case.L, case.L, case.H, case.causal, backward=True)
            moved += attention_bytes(case.B, case.N, case.K, case.L, case.L, case.H,
                                     dtype_bytes=jnp.dtype(self.platform.dtype).itemsize, backward=True)
        # Accelerators in a ring are that many chips; simulated CPU devices share one host.
        chips = ring_size if self.platform.backend != "cpu" else 1
        info = dict(candidate=name, mode=mode, B=case.B, L=case.L, N=case.N, K=case.K, H=case.H, causal=case.causal,
                    dtype=jnp.dtype(self.platform.dtype).name, platform=self.platform.kind,
                    interpreted=self.platform.interpreted, ring_size=ring_size, chips=chips, flops=flops,
                    bytes=moved, oracle_errors=errors)
        benchmark.extra_info.update(info)
        if benchmark.disabled:
            benchmark.pedantic(run_once, rounds=1)  # runs it once: the program still has to work
            return
        start = time.perf_counter()
        run_once()  # warm-up, and the measure of how many rounds fit
        rounds = self.rounds(time.perf_counter() - start)
        local_times, setup = [], None
        if local_fn is not None:
            local, local_args = self.program(local_fn, mode, *args)
            jax.block_until_ready(local(*local_args))

            def setup():  # before each timed round, untimed: the two alternate, so load drift hits both
                start = time.perf_counter()
                jax.block_until_ready(local(*local_args))
                local_times.append(time.perf_counter() - start)

        benchmark.pedantic(run_once, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["median_s"] = seconds
        benchmark.extra_info.update(against(self.peaks, benchmark.extra_info))
        if local_times:
            local_s = statistics.median(local_times)
            benchmark.extra_info.update(local_s=local_s, ring_efficiency=ring_size * local_s / seconds)
        self.config.stash[RESULTS].append(benchmark.extra_info)  # the dict the JSON will hold


@pytest.fixture(scope="session")
def bench(request, peaks):
    return Bench(request.config, peaks)


# --- reporting ----------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # before pytest-benchmark's wrapper writes the JSON
def pytest_sessionfinish(session):
    """Measured ceilings again at the end, the best of both kept, and every result rescaled."""
    config = session.config
    peaks = config.stash.get(PEAKS, None)
    if peaks is not None and peaks["chip"] is None and config.stash[RESULTS]:
        again = measured_peaks(config.stash[PLATFORM])
        peaks.update(flops_per_s=max(peaks["flops_per_s"], again["flops_per_s"]),
                     bytes_per_s=max(peaks["bytes_per_s"], again["bytes_per_s"]))
        for info in config.stash[RESULTS]:
            info.update(against(peaks, info))
    yield


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    if PLATFORM not in config.stash:
        return
    results, peaks = config.stash[RESULTS], config.stash[PEAKS]
    terminalreporter.write_sep("=", "roofline")
    if not results:
        terminalreporter.write_line("nothing timed (--benchmark-disable, or no benchmark passed)")
        return
    terminalreporter.write_line(roofline.peaks_line(peaks))
    for line in roofline.markdown_table(results):
        terminalreporter.write_line(line)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    if PLATFORM in config.stash and config.stash[PEAKS] is not None:
        output_json["roofline"] = config.stash[PEAKS]


def pytest_benchmark_update_machine_info(config, machine_info):
    """So that --benchmark-compare warns when two runs come from different chips or JAX versions."""
    machine_info["jax"] = jax.__version__
    machine_info["device_kind"] = jax.devices()[0].device_kind
    machine_info["device_count"] = len(jax.devices())
