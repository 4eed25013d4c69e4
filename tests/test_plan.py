"""`python -m model_zoo plan`: the training step compiled for chips that are not here.

The compiling tests need the `aot` extra and JAX_PLATFORMS=cpu (see tests/test_aot.py) and skip
otherwise; the sharding they rely on is checked on the CPU mesh everywhere.
"""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P
from test_aot import missing

from model_zoo.config import TINY
from model_zoo.model import init_params
from model_zoo.sharding import make_mesh, param_specs
from ring_attn import aot


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
    with pytest.raises(ValueError, match="unknown topology 'a100:8': expected 'h100:G'"):
        aot.topology("a100:8")
    if aot.missing_compiler("v5p") is not None:
        with pytest.raises(RuntimeError, match=r"compiling for v5p needs libtpu.*pip install -e '\.\[aot\]'"):
            aot.topology("v5p:2x2x1")
    else:
        assert aot.topology("v5p:2x2x1").num_chips == 4


def _plan(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "model_zoo", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_plan_reports_a_step_that_fits():
    result = _plan("--preset", "tiny", "--seq-len", "8192", "--topology", "h100:8")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "8,192 tokens x 1 on h100:8 (mesh sp=8)" in out
    assert ": fits" in out and "'triton'" in out and "ring transfers exposed        0 of" in out
    assert "compiling the training step for h100:8: done" in result.stderr  # the progress line


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
def test_plan_exits_1_naming_the_shortfall():
    """LWM-7B's float32 parameters and AdamW state (about 81 GB) cannot fit one H100."""
    result = _plan("--preset", "lwm-7b", "--seq-len", "2048", "--topology", "h100:1")
    assert result.returncode == 1
    assert "does not fit" in result.stdout
    assert "GiB more than h100:1's 79.10 GiB" in result.stderr
