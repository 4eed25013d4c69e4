"""Attention benchmarks: this platform's kernel families and its reference, one device, and the ring.

Kernel families (`ring_attn.ring_attention`, one device): on CPU the jnp blockwise path
(impl="xla", what "auto" picks there); on GPU Triton ("pallas_triton") and Mosaic GPU
("pallas_mgpu"); on TPU Mosaic TPU ("pallas_tpu"). The reference, in the same run: XLA's dense
attention (`jax.nn.dot_product_attention(implementation="xla")`) on CPU, cuDNN's
(implementation="cudnn") on GPU, splash attention on TPU. The ring: the same families over every
device of the platform (8 simulated ones on a CPU), with the remote-DMA ring beside them on TPU;
its inputs are taken as already in the ring's layout (zigzag when causal: a one-off permutation a
data pipeline does), and its time is set against R × one step's kernel call on each device's own
shard with no transfer (`ring_efficiency`: 1.00 when the ring costs nothing beyond its compute).
Each of forward, backward (from the forward's residuals) and forward+backward, after the
function passed the float64 oracle at a short length.
"""

import functools

import jax
import pytest
from conftest import MODES, SEQ

import ring_attn
from ring_attn.ring_remote_dma import ring_attention_remote_dma

FAMILIES = {"cpu": ("xla",), "gpu": ("pallas_triton", "pallas_mgpu"), "tpu": ("pallas_tpu",)}
REFERENCES = {"cpu": "xla_dense", "gpu": "cudnn", "tpu": "splash"}


def candidates(platform):
    """Names of what runs on one device: `ring_attn.<impl>` for ours, then the reference."""
    return [f"ring_attn.{impl}" for impl in FAMILIES[platform.kind]] + [REFERENCES[platform.kind]]


def ring_families(platform):
    families = [f for f in FAMILIES[platform.kind] if not (f == "pallas_mgpu" and platform.interpreted)]
    if platform.kind == "tpu":
        families.append("remote_dma")
    return [f"ring.{family}" for family in families]


def attention(name, causal, platform):
    """fn(q, k, v) of a candidate on one device."""
    if name == "xla_dense":
        return functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="xla")
    if name == "cudnn":
        if platform.backend != "gpu":
            pytest.skip("cuDNN attention needs a GPU")
        return functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn")
    if name == "splash":
        from tpu_check import splash_attention

        return functools.partial(splash_attention, causal=causal, interpret=platform.interpreted)
    return functools.partial(ring_attn.ring_attention, causal=causal, impl=name.removeprefix("ring_attn."))


def ring(name, mesh, causal, platform):
    """(fn(q, k, v) over `mesh`'s "sp" axis, its layout, one ring step's compute without the ring).

    A step of the zigzag ring computes, on every device, the local queries against half a k/v
    shard with no mask ([T] x [T/2]; the diagonal step, 1 in R, a little less); a step of a
    contiguous ring a whole [T] x [T] block (causal: on the busiest device, the last). The third
    function is that kernel call on each device's own shard, for `ring_efficiency`."""
    family = name.removeprefix("ring.")
    check_vma = not platform.interpreted  # interpret mode runs only without shard_map's vma checks
    if family == "remote_dma":  # contiguous shards only
        layout = "contiguous"
        attend = functools.partial(ring_attention_remote_dma, axis_name="sp", causal=causal)
        family = "pallas_tpu"
    else:
        layout = "zigzag" if causal else "contiguous"
        attend = functools.partial(ring_attn.ring_attention, axis_name="sp", causal=causal, layout=layout,
                                   impl=family)

    def step(q, k, v):
        kept = k.shape[1] // 2 if layout == "zigzag" else k.shape[1]
        return ring_attn.ring_attention(q, k[:, :kept], v[:, :kept], impl=family)

    sharded = functools.partial(jax.shard_map, mesh=mesh, in_specs=(SEQ,) * 3, out_specs=SEQ, check_vma=check_vma)
    return sharded(attend), layout, sharded(step)


@pytest.mark.parametrize("mode", MODES)
def test_attention(benchmark, bench, platform, kernel_case, mode):
    name, case = kernel_case
    fn = attention(name, case.causal, platform)
    errors = bench.check(name, case, fn)
    bench.run(benchmark, name, case, mode, fn, bench.inputs(case), errors=errors)


@pytest.mark.parametrize("mode", MODES)
def test_ring(benchmark, bench, platform, ring_case, mode):
    name, case = ring_case
    R = platform.ring_size
    if R < 2:
        pytest.skip(f"a ring needs two devices or more, this host has {R}")
    mesh = bench.mesh(R)
    fn, layout, step = ring(name, mesh, case.causal, platform)
    reorder = None
    if layout == "zigzag":
        reorder = (functools.partial(ring_attn.zigzag, ring_size=R), functools.partial(ring_attn.unzigzag, ring_size=R))
    errors = bench.check(name, case, fn, mesh=mesh, layout=reorder)
    bench.run(benchmark, name, case, mode, fn, bench.inputs(case, mesh), errors=errors, ring_size=R, local_fn=step)
