"""Compiled, not run: every kernel family for 8 H100s and 4 TPU v5p chips by the real compilers.

Needs the `aot` extra (XLA's CUDA compiler and libtpu; Python 3.12) and `JAX_PLATFORMS=cpu`; skips
otherwise. At 8K tokens a device, bf16, 8 heads of 128 (MLA's case: q/k 192, v 128), each case is
compiled forward and forward + backward, and the compiled program must hold its platform's kernels, no host callback,
Triton kernels within the card's shared memory, and no exposed ring transfer
(`ring_attn.aot.ring_transfers`).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ring_attn
from ring_attn import aot


def missing():
    if aot.missing_compiler() is not None:
        return "the aot extra is not installed (pip install -e '.[aot]' on Python 3.12)"
    if jax.default_backend() != "cpu":
        return "deviceless compilation runs with JAX_PLATFORMS=cpu"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

PER_DEVICE = 8192
N, H = 8, 128


@functools.cache
def _mesh(name):
    topo = aot.topology(name)
    return aot.mesh(topo, {"sp": topo.num_chips})


def _struct(mesh, shape, spec, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


# The ring's cases: ring_attention_global keyword arguments, and whether they carry segment ids / GQA / sinks.
CASES = {
    "causal_zigzag": dict(causal=True, layout="zigzag"),
    "segments_gqa": dict(causal=True, segments=True, kv_heads=2),
    "non_causal": dict(),
    "window": dict(causal=True, window=4096),
    "soft_cap_sinks": dict(causal=True, layout="zigzag", logit_soft_cap=30.0, sinks=True),
    "documents": dict(causal=True, segments=True),  # packed documents: the ring ends early
    "mla": dict(causal=True, layout="zigzag", head_dims=(192, 128)),  # causal_zigzag at DeepSeek's q/k 192, v 128
}
FAMILIES = [("h100:8", "pallas_triton", "triton"), ("h100:8", "pallas_mgpu", "mosaic_gpu"),
            ("v5p:2x2x1", "pallas_tpu", "mosaic_tpu")]


def ring_program(topology, impl, options, backward, *, per_device=PER_DEVICE, num_heads=N, loss="square"):
    """(jitted function, argument shapes) of `ring_attention_global` on `topology`, bf16, batch 1:
    `options` are its keyword arguments, and `kv_heads`, `head_dims` (q/k, v), `segments` and
    `sinks` shape the arguments. Backward: `grad` of the loss of the output, `(out**2).sum()`
    ("square": d_out depends on the output, as in a model) or `out.sum()` ("sum": a constant)."""
    mesh = _mesh(topology)
    L = per_device * mesh.shape["sp"]
    options = dict(options)
    kv_heads = options.pop("kv_heads", num_heads)
    segments, sinks = options.pop("segments", False), options.pop("sinks", False)
    H_qk, H_v = options.pop("head_dims", (H, H))
    seq = P(None, "sp")
    args = [_struct(mesh, (1, L, num_heads, H_qk), seq), _struct(mesh, (1, L, kv_heads, H_qk), seq),
            _struct(mesh, (1, L, kv_heads, H_v), seq),
            _struct(mesh, (1, L), seq, jnp.int32) if segments else None,
            _struct(mesh, (num_heads,), P(), jnp.float32) if sinks else None]

    def attention(q, k, v, ids, sink_logits):
        return ring_attn.ring_attention_global(
            q, k, v, mesh=mesh, axis_name="sp", segment_ids=ids, sinks=sink_logits, impl=impl, **options
        )

    if not backward:
        return jax.jit(attention), args

    def loss_of_output(q, k, v, ids, sink_logits):
        out = attention(q, k, v, ids, sink_logits).astype(jnp.float32)
        return out.sum() if loss == "sum" else jnp.square(out).sum()

    return jax.jit(jax.grad(loss_of_output, argnums=(0, 1, 2, 4) if sinks else (0, 1, 2))), args


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("topology", "impl", "family"), FAMILIES, ids=[f[2] for f in FAMILIES])
def test_ring_compiles_with_every_transfer_hidden(topology, impl, family, case, backward, tmp_path):
    fn, args = ring_program(topology, impl, CASES[case], backward)
    options = {"xla_dump_to": str(tmp_path)} if topology.startswith("h100") else {}
    compiled = fn.lower(*args).compile(compiler_options=options)
    text = compiled.as_text()
    assert aot.kernels(text).get(family, 0) > 0, f"no {family} kernel in {aot.kernels(text)}"
    assert not aot.host_callbacks(text)
    transfers = aot.ring_transfers(text)
    assert transfers, "the ring's transfers are not in the program"
    exposed = aot.exposed(transfers)
    assert not exposed, f"{len(exposed)} of {len(transfers)} ring transfers exposed: {exposed}"
    if family == "triton":
        launches = aot.cuda_kernels(str(tmp_path), prefix="ring_attn")
        assert launches, "no Triton kernel launch in the thunk sequence"
        for launch in launches:
            assert launch.shared_memory <= aot.H100_SHARED_MEMORY_PER_BLOCK, launch


def test_auto_takes_each_platforms_kernels():
    """impl="auto" follows the mesh's devices on a CPU host: Triton for H100s, Mosaic for TPU."""
    for topology, family in (("h100:8", "triton"), ("v5p:2x2x1", "mosaic_tpu")):
        fn, args = ring_program(topology, "auto", CASES["causal_zigzag"], backward=False)
        text = fn.lower(*args).compile().as_text()
        assert family in aot.kernels(text) and not aot.host_callbacks(text)


H100_DEVICE = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


@pytest.mark.parametrize(("platform", "device", "kernel_target"),
                         [("cuda", H100_DEVICE, "__gpu$xla.gpu.triton"), ("tpu", None, "tpu_custom_call")])
def test_export_under_an_abstract_mesh_takes_the_platforms_kernels(platform, device, kernel_target):
    """jax.export under an AbstractMesh carries the kernels of the platform it exports for: of its
    abstract device, or with none (TPU), of the export platform's platform_dependent branch. (A
    Triton kernel needs the device's compute capability, so a CUDA export names the device.)"""
    mesh = jax.sharding.AbstractMesh((4,), ("sp",), abstract_device=device)
    x = jax.ShapeDtypeStruct((1, 4 * 1024, N, H), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "sp")))

    def attention(q, k, v):
        return ring_attn.ring_attention_global(q, k, v, mesh=mesh, axis_name="sp", causal=True, impl="auto")

    with jax.sharding.use_abstract_mesh(mesh):
        # Triton kernels carry no serialization guarantee, so JAX asks for this opt-in.
        unchecked = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        exported = jax.export.export(jax.jit(attention), platforms=(platform,), disabled_checks=unchecked)(x, x, x)
    text = exported.mlir_module()
    assert kernel_target in text and "callback" not in text


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_remote_dma_ring_compiles_for_tpu(backward):
    from ring_attn.ring_remote_dma import ring_attention_remote_dma

    mesh = _mesh("v5p:2x2x1")
    L = PER_DEVICE * mesh.shape["sp"]
    x = _struct(mesh, (1, L, N, H), P(None, "sp"))

    def attention(q, k, v):
        local = functools.partial(ring_attention_remote_dma, axis_name="sp", causal=True)
        return jax.shard_map(local, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))(q, k, v)

    fn = jax.jit(jax.grad(lambda *a: jnp.square(attention(*a).astype(jnp.float32)).sum(), argnums=(0, 1, 2))
                 if backward else attention)
    text = fn.lower(x, x, x).compile().as_text()
    assert aot.kernels(text).get("mosaic_tpu", 0) > 0 and not aot.host_callbacks(text)
    assert not aot.exposed(aot.ring_transfers(text))


@pytest.mark.parametrize("topology", ["h100:8", "v5p:2x2x1"])
@pytest.mark.parametrize("strategy", ["ring", "all_gather", "ulysses", "usp"])
def test_context_attention_strategies_compile(topology, strategy):
    topo = aot.topology(topology)
    axes = {"ring": 2, "uly": topo.num_chips // 2} if strategy == "usp" else {"sp": topo.num_chips}
    mesh = aot.mesh(topo, axes)
    axis = ("ring", "uly") if strategy == "usp" else "sp"
    L = PER_DEVICE * topo.num_chips
    x = _struct(mesh, (1, L, N, H), P(None, axis))

    def attention(q, k, v):
        local = functools.partial(ring_attn.context_attention, axis_name=axis, strategy=strategy, causal=True,
                                  layout="contiguous")
        return jax.shard_map(local, mesh=mesh, in_specs=P(None, axis), out_specs=P(None, axis))(q, k, v)

    loss = lambda *a: jnp.square(attention(*a).astype(jnp.float32)).sum()  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
    family = "triton" if topology.startswith("h100") else "mosaic_tpu"
    assert aot.kernels(text).get(family, 0) > 0 and not aot.host_callbacks(text)
    assert not aot.exposed(aot.ring_transfers(text))


@pytest.mark.parametrize("topology", ["h100:8", "v5p:2x2x1"])
def test_ring_decode_compiles(topology):
    mesh = _mesh(topology)
    R = mesh.shape["sp"]
    q = _struct(mesh, (1, 1, N, H), P())
    cache = _struct(mesh, (1, PER_DEVICE * R, N, H), P(None, "sp"))

    def decode(q, k, v):
        local = functools.partial(ring_attn.ring_decode, axis_name="sp", kv_length=PER_DEVICE * R - 7)
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "sp"), P(None, "sp")), out_specs=P())(q, k, v)

    text = jax.jit(decode).lower(q, cache, cache).compile().as_text()
    assert not aot.host_callbacks(text)


@pytest.mark.parametrize(("topology", "impl", "family"), [("h100:8", "pallas", "triton"),
                                                         ("v5p:2x2x1", "pallas", "mosaic_tpu")])
def test_fused_feedforward_compiles(topology, impl, family):
    mesh = _mesh(topology)
    D, F = 1024, 2816
    x = _struct(mesh, (1, PER_DEVICE * mesh.shape["sp"], D), P(None, "sp"))
    w_in, w_out = _struct(mesh, (D, F), P()), _struct(mesh, (F, D), P())

    def ffn(x, wg, wu, wd):
        local = functools.partial(ring_attn.blockwise_feedforward, chunk_size=256, impl=impl)
        specs = (P(None, "sp"), P(), P(), P())
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(None, "sp"))(x, wg, wu, wd)

    loss = lambda *a: jnp.square(ffn(*a).astype(jnp.float32)).sum()  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, w_in, w_in, w_out).compile().as_text()
    assert aot.kernels(text).get(family, 0) > 0 and not aot.host_callbacks(text)
