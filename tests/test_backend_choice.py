"""Kernels are chosen for the platform being compiled for, not by `jax.default_backend()` alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import Kernel, PerPlatform, kernels_for, resolve_impl


def test_each_platform_has_its_kernels():
    assert resolve_impl("auto", "gpu") == Kernel.TRITON
    assert resolve_impl("auto", "tpu") == Kernel.TPU
    assert resolve_impl("auto", "cpu") == Kernel.XLA
    assert resolve_impl("pallas", "cpu") == Kernel.TRITON_INTERPRET
    assert resolve_impl("pallas_tpu", "gpu") == Kernel.TPU_INTERPRET
    assert resolve_impl("pallas_mgpu", "gpu") == Kernel.MGPU


def test_a_cpu_mesh_takes_the_cpu_kernel_without_a_branch():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
    with jax.set_mesh(mesh):
        assert kernels_for("auto") == PerPlatform(Kernel.XLA)


def test_a_mesh_without_devices_gives_every_platform_its_kernel():
    mesh = jax.sharding.AbstractMesh((4,), ("sp",))
    with jax.sharding.use_abstract_mesh(mesh):
        kernels = kernels_for("auto")
    assert kernels.default == Kernel.XLA
    assert dict(kernels.others) == {"cuda": Kernel.TRITON, "rocm": Kernel.TRITON, "tpu": Kernel.TPU}


def test_dispatch_branches_only_where_platforms_differ():
    def scaled(factor, x):
        return x * factor

    x = jnp.arange(4.0)
    same = jax.make_jaxpr(lambda x: PerPlatform(2.0, (("tpu", 2.0),)).dispatch(scaled, x))(x)
    assert "platform_index" not in str(same)
    per_platform = PerPlatform(2.0, (("cuda", 3.0), ("tpu", 5.0)))
    branched = jax.make_jaxpr(lambda x: per_platform.dispatch(scaled, x))(x)
    assert "platform_index" in str(branched)
    # Compiled for this CPU, the default branch runs.
    np.testing.assert_array_equal(jax.jit(lambda x: per_platform.dispatch(scaled, x))(x), 2.0 * np.arange(4.0))


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown impl='cuda'"):
        pallas_kernels.kernels_for("cuda")
