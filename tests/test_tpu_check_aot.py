"""bench/tpu_check.py's timed programs compiled for TPU v5p without one: Mosaic kernels, no host callback.

Needs the `aot` extra (libtpu; Python 3.12) and `JAX_PLATFORMS=cpu`; skips otherwise, for the
reason tests/test_aot.py gives. The single-chip programs (attention: ours, splash attention and
XLA's; the SwiGLU feedforward: ours and XLA's) compile for one chip of a v5p:2x2x1 slice at the
check's timed shapes; the rings (remote DMA, ppermute) for all four chips, at a shorter shard.
Tracing under the chip's mesh (`jax.set_mesh`) is what makes `impl="pallas_tpu"` compile for TPU
here rather than interpret, as it would for the CPU backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bench_script
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_aot import missing

from ring_attn import aot

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))



def tpu_check():
    return bench_script("tpu_check")


@functools.cache
def meshes():
    """One v5p chip, and the four of a v5p:2x2x1 slice as a ring."""
    topo = aot.topology("v5p:2x2x1")
    return Mesh(np.array(topo.devices[:1]), ("chip",)), aot.mesh(topo, {"sp": topo.num_chips})


def structs(mesh, spec, shapes, dtype=jnp.bfloat16):
    return [jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, spec)) for s in shapes]


def compiled_text(mesh, fn, args):
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile().as_text()


def assert_tpu_program(text, kernels):
    """At least `kernels` Mosaic TPU kernels (0: XLA's own program) and nothing run on the host."""
    found = aot.kernels(text).get("mosaic_tpu", 0)
    assert found >= kernels, f"{found} Mosaic TPU kernels, expected at least {kernels}: {aot.kernels(text)}"
    assert not aot.host_callbacks(text), aot.host_callbacks(text)[:3]


# Kernels each program holds at least: forward, and forward + backward (splash: fwd, dq, dkv;
# ours: fwd, dq, dk/dv).
ATTENTION_KERNELS = {"ring_attn": (1, 3), "splash": (1, 3), "xla": (0, 0)}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("name", list(ATTENTION_KERNELS))
def test_attention_programs_compile_for_v5p(name, H, causal):
    chip, _ = meshes()
    B, L, N, K = 2, 8192, 16, 16  # the check's timed shape at 8K
    q, k, v, d_out = structs(chip, P(), [(B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H)])
    fwd, fwd_bwd = tpu_check().attention_programs(causal, on_tpu=True)[name]
    fwd_kernels, all_kernels = ATTENTION_KERNELS[name]
    assert_tpu_program(compiled_text(chip, fwd, (q, k, v)), fwd_kernels)
    assert_tpu_program(compiled_text(chip, fwd_bwd, (q, k, v, d_out)), all_kernels)


def test_feedforward_programs_compile_for_v5p():
    chip, _ = meshes()
    M, D, F = 8192, 4096, 11008  # LLaMA-7B widths, the check's timed shape
    args = structs(chip, P(), [(M, D), (D, F), (D, F), (F, D), (M, D)])
    programs = tpu_check().feedforward_programs(on_tpu=True)
    for name, (fwd_kernels, all_kernels) in {"ring_attn": (1, 3), "xla": (0, 0)}.items():
        fwd, fwd_bwd = programs[name]
        assert_tpu_program(compiled_text(chip, fwd, args[:-1]), fwd_kernels)
        assert_tpu_program(compiled_text(chip, fwd_bwd, args), all_kernels)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ring_programs_compile_for_v5p(causal):
    _, ring = meshes()
    L, N, H = 4 * 2048, 16, 128
    args = structs(ring, P(None, "sp"), [(1, L, N, H)] * 4)
    for name, (fwd, fwd_bwd) in tpu_check().ring_programs(ring, causal, on_tpu=True).items():
        text = compiled_text(ring, fwd, args[:-1])
        assert_tpu_program(text, 1)
        if name == "remote_dma":
            assert "ring_attn_tpu_fwd_ring_step" in text, name
        assert_tpu_program(compiled_text(ring, fwd_bwd, args), 3)
