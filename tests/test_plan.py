"""`python -m model_zoo plan`: the training step compiled for chips that are not here.

The compiling tests need the `aot` extra and JAX_PLATFORMS=cpu (see tests/test_aot.py) and skip
otherwise; the sharding they rely on is checked on the CPU mesh everywhere.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P
from test_aot import missing

from model_zoo import plan
from model_zoo.config import LWM_7B, TINY
from model_zoo.model import init_params
from model_zoo.sharding import make_mesh, param_specs
from ring_attn import aot, cost
from ring_attn.chips import CHIPS, chip_for_device_kind


def test_parameters_shard_over_the_sequence_axis_too():
    """extra_axes=("sp",) shards each parameter's fsdp dimension over sp as well (ZeRO-3 over the
    ring), and leaves a dimension sp does not divide whole."""
    mesh = make_mesh(fsdp=2, sp=4)
    shapes = jax.eval_shape(lambda key: init_params(TINY, key), jax.random.key(0))
    plain = param_specs(shapes, mesh)
    zero = param_specs(shapes, mesh, extra_axes=("dp", "sp", "uly"))
    assert plain["layers"]["wq"] == P(None, "fsdp", "tp")
    assert zero["layers"]["wq"] == P(None, ("fsdp", "sp"), "tp")
    assert zero["embed"] == P("tp", ("fsdp", "sp"))
    assert zero["final_norm"] == P(None)
    odd = param_specs({"wq": jax.ShapeDtypeStruct((1, 6, 8), "float32")}, mesh, extra_axes=("sp",))
    assert odd["wq"] == P(None, "fsdp", "tp")  # 6 splits over fsdp=2, not over fsdp x sp = 8


def test_topologies_are_named_and_their_compilers_asked_for():
    for name in ("h100-pcie:8", "a100", "b200:0", "v5e:2x2x1", "v4:2x2", "v6e:4", "tpu:2x2"):
        with pytest.raises(ValueError, match=f"unknown topology '{name}': expected 'a100:G'"):
            aot.topology(name)
    for kind in [*aot.CUDA_DEVICES, *aot.TPU_GENERATIONS]:
        assert f"'{kind}:" in aot.TOPOLOGY_FORMS, kind
    if aot.missing_compiler("v5p") is not None:
        with pytest.raises(RuntimeError, match=r"compiling for v5p needs libtpu.*pip install -e '\.\[aot\]'"):
            aot.topology("v5p:2x2x1")
    else:
        assert aot.topology("v5p:2x2x1").num_chips == 4


def test_the_h100_target_is_the_card_xla_describes():
    """The generated target config keeps what the H100 tests were compiled against."""
    config = aot.H100_TARGET_CONFIG
    assert "core_count: 132\n" in config and "shared_memory_per_block_optin: 232448\n" in config
    assert "device_memory_size: 84929347584\n" in config and "cuda_compute_capability {\n    major: 9\n  }" in config
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in config
    assert aot.H100_MEMORY == 84929347584 and aot.V5P_MEMORY == 95 * 2**30
    b200 = aot.cuda_target_config("b200")
    assert "major: 10\n" in b200 and "core_count: 148\n" in b200 and "device_memory_size: 191514411008\n" in b200
    assert "major: 8\n" in aot.cuda_target_config("a100")


@pytest.mark.parametrize("key", sorted(cost.CHIP_HARDWARE))
def test_each_topology_is_priced_with_its_own_chip(key):
    chip = CHIPS[key]
    topo = aot.Topology(f"{key}:8", chip.platform, (None,) * 8, int(chip.program_memory_bytes), chip)
    axes = plan.default_mesh(topo)
    strategy, step_s = plan._predicted(LWM_7B, topo, axes, 1, 32768)
    hardware = cost.HARDWARE[cost.CHIP_HARDWARE[key]]
    assert hardware.flops_per_s == chip.flops_per_s
    dense_s = 2 * 4 * LWM_7B.num_params * 32768 / (8 * chip.flops_per_s)  # remat="full": 4 passes
    choice = cost.choose_strategy(hardware, seq_len=32768, num_devices=8, num_heads=LWM_7B.num_heads,
                                  num_kv_heads=LWM_7B.num_kv_heads, head_dim=LWM_7B.head_dim,
                                  layout=LWM_7B.ring_layout)
    assert step_s == pytest.approx(dense_s + choice.costs[strategy] * LWM_7B.num_layers)


def _plan(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "model_zoo", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
@pytest.mark.parametrize("topology", ["h100:8"])
def test_plan_reports_a_step_that_fits(topology):
    result = _plan("--preset", "tiny", "--seq-len", "8192", "--topology", topology)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "8,192 tokens x 1 on h100:8 (mesh sp=8)" in out
    assert ": fits" in out and "'triton'" in out and "ring transfers exposed        0 of" in out
    assert "compiling the training step for h100:8: done" in result.stderr  # the progress line


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
@pytest.mark.parametrize("topology", ["h100:1"])
def test_plan_exits_1_naming_the_shortfall(topology):
    """LWM-7B's float32 parameters and AdamW state (about 81 GB) cannot fit one H100."""
    result = _plan("--preset", "lwm-7b", "--seq-len", "2048", "--topology", topology)
    assert result.returncode == 1
    assert "does not fit" in result.stdout
    assert "GiB more than h100:1's 79.10 GiB" in result.stderr


# LWM-7B at 32K tokens on one topology of each chip family besides h100 and v5p: the smallest slice
# whose step fits (TPU v4 and v6e: 8 chips of about 31 GiB; v5e: 16 of 15.75 GiB), and the kernels
# its platform compiles.
CHIP_FAMILIES = [("a100:8", "triton"), ("h200:8", "triton"), ("b200:8", "triton"),
                 ("v4:2x2x2", "mosaic_tpu"), ("v5e:4x4", "mosaic_tpu"), ("v6e:2x4", "mosaic_tpu")]


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
@pytest.mark.parametrize("topology,kernel", CHIP_FAMILIES)
def test_lwm_7b_at_32k_compiles_for_each_chip_family(topology, kernel):
    """In this process, not a subprocess: it holds libtpu's host lock once a test has compiled for TPU."""
    topo = aot.topology(topology)
    assert chip_for_device_kind(topo.devices[0].device_kind) is topo.chip  # XLA's device is the table's chip
    result = plan.plan(LWM_7B, seq_len=32768, topology=topology, progress=False)
    assert result.chip_bytes == int(topo.chip.program_memory_bytes)
    assert result.fits, result.report()
    assert set(result.kernels) == {kernel} and result.transfers > 0
    if topology.startswith("a100"):  # XLA's CUDA compiler overlaps collectives on Hopper and newer only
        assert result.exposed == 0 or "xla_gpu_enable_latency_hiding_scheduler=true" in result.note
    else:
        assert result.exposed == 0, result.report()


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_a_chip_the_compilers_cannot_target_is_refused_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(aot, "ptx_compiler", lambda: ((12, 4), "nvidia-nvjitlink-cu12 12.4.127"))
    refusal = (r"compiling for b200 \(compute capability 10\.0\) needs CUDA 12\.8 or newer, and the newest PTX "
               r"compiler installed is nvidia-nvjitlink-cu12 12\.4\.127: pip install -U 'jax\[cuda13\]'")
    with pytest.raises(RuntimeError, match=refusal):
        aot.topology("b200:8")
    assert aot.topology("a100:8").num_chips == 8  # CUDA 12.4 generates code for compute capability 8.0
    # A libtpu that does not know the generation: v6e under a name no libtpu has.
    unknown = dataclasses.replace(aot.TPU_GENERATIONS["v6e"], libtpu_name="v99")
    monkeypatch.setitem(aot.TPU_GENERATIONS, "v6e", unknown)
    with pytest.raises(RuntimeError, match=r"the installed libtpu \S+ cannot compile for TPU v6e \(.*v99.*\): "
                       r"install a newer one, pip install -U libtpu"):
        aot.topology("v6e:2x2")


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_a_slice_that_hosts_do_not_tile_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"topology 'v5e:3x3' does not divide into hosts of 2x2x1 chips"):
        aot.topology("v5e:3x3")


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_a_second_tpu_compilation_on_the_host_is_told_to_wait(monkeypatch):
    aot.topology("v5p:2x2x1")  # this process now holds libtpu's host lock
    monkeypatch.delenv("ALLOW_MULTIPLE_LIBTPU_LOAD", raising=False)  # libtpu's switch that lifts the lock
    result = _plan("--preset", "tiny", "--seq-len", "8192", "--topology", "v5e:2x2")
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "sudo rm" not in error[0], result.stderr[-3000:]
    assert f"another process (pid {os.getpid()}) on this host is compiling for TPU: libtpu runs one TPU " \
           "compilation per host at a time; wait for the other one to finish" in error[0]


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_a_step_the_tpu_compiler_cannot_fit_is_said_not_to_fit():
    """libtpu refuses a program whose temporaries exceed a chip's HBM; plan says so, and
    --max-seq-len stops there."""
    with pytest.raises(plan.CompilerOutOfMemory, match=r"1,048,576 tokens x 1 on v5e:1x1 does not fit: the compiler "
                       r"says: Ran out of memory on HBM.*exceeds available HBM \(15\.75G\)"):
        plan.plan(TINY, seq_len=2**20, topology="v5e:1x1", progress=False)
    assert plan.max_seq_len(TINY, topology="v5e:1x1", start=2**20, progress=False) == (None, None)
