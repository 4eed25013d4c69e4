"""The fused Pallas SwiGLU feedforward (pallas_kernels.feedforward_triton / feedforward_tpu), run in
interpret mode on the CPU against the float64 reference: forward and the gradients w.r.t. x and
all three weights, float32 and bfloat16, under `jax.jit`, both directly and through
`ring_attn.blockwise_feedforward`. That the kernels also lower for real hardware is checked by
exporting them for CUDA (the Triton lowering) and for TPU (the Mosaic lowering), which needs
neither.

Interpret mode costs seconds per compile, so shapes are small; D and F that are not multiples of
the tiles exercise the padding, and small explicit tiles exercise every loop and grid axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, abstract_mesh, assert_close, exported_module
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec

import pallas_kernels
import reference
import ring_attn
from pallas_kernels import feedforward_tpu, feedforward_triton

GRADS = ("dx", "dw_gate", "dw_up", "dw_down")
# LWM-7B (LLaMA-2 7B) widths, for the lowering checks.
LWM_D, LWM_F = 4096, 11008


def random_ffn(seed, lead, D, F, dtype):
    """x [*lead, D], w_gate, w_up [D, F], w_down [F, D] and a cotangent, scaled to unit outputs."""
    rng = np.random.default_rng(seed)
    shapes = ((*lead, D), (D, F), (D, F), (F, D), (*lead, D))
    scales = (1.0, D**-0.5, D**-0.5, F**-0.5, 1.0)
    return [jnp.asarray(rng.standard_normal(s) * c, dtype) for s, c in zip(shapes, scales)]


def value_and_grads(fn, x, w_gate, w_up, w_down, d_out):
    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(x, w_gate, w_up, w_down, d_out):
        out, vjp = jax.vjp(fn, x, w_gate, w_up, w_down)
        return out, vjp(d_out)

    return run(x, w_gate, w_up, w_down, d_out)


def assert_matches_reference(fn, x, w_gate, w_up, w_down, d_out):
    out, grads = value_and_grads(fn, x, w_gate, w_up, w_down, d_out)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, w_gate, w_up, w_down, d_out)]
        lead = x.shape[:-1]

        def swiglu64(x, w_gate, w_up, w_down):
            y = reference.swiglu(x.reshape(1, -1, x.shape[-1]), w_gate, w_up, w_down, dtype=jnp.float64)
            return y.reshape(*lead, -1)

        expected, vjp64 = jax.vjp(swiglu64, *args64[:4])
        expected_grads = vjp64(args64[4])
    assert out.dtype == x.dtype, f"out dtype {out.dtype} != x's {x.dtype}"
    assert_close(out, expected, name="out")
    for name, g, e, primal in zip(GRADS, grads, expected_grads, (x, w_gate, w_up, w_down)):
        assert g.dtype == primal.dtype, f"{name} dtype {g.dtype} != its input's {primal.dtype}"
        assert_close(g, e, kind="gradient", name=name)


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blockwise_feedforward_matches_reference(impl, dtype):
    # M = 40 tokens in chunks of 20, D = 48 and F = 80: every axis padded, two token tiles.
    x, w_gate, w_up, w_down, d_out = random_ffn(7, (2, 20), 48, 80, dtype)
    fn = functools.partial(ring_attn.blockwise_feedforward, chunk_size=20, impl=impl)
    assert_matches_reference(fn, x, w_gate, w_up, w_down, d_out)


def test_triton_kernels_loop_over_every_tile():
    # Tiles of 16: 3 token tiles (the last one half padding) x 5 hidden tiles, 3 chunks of D.
    x, w_gate, w_up, w_down, d_out = random_ffn(11, (40,), 48, 80, jnp.float32)
    fn = functools.partial(feedforward_triton.feedforward, block_m=16, block_f=16, block_d=16, interpret=True)
    assert_matches_reference(fn, x, w_gate, w_up, w_down, d_out)


def test_tpu_kernels_accumulate_over_every_tile():
    # Per device: 3 token tiles of 16 (M = 40) x 2 hidden tiles of 128 (F = 200 padded to 256), D = 48
    # padded to 128 lanes;
    # inside shard_map with the vma check, the weights split over "tp" as the LWM model does.
    x, w_gate, w_up, w_down, d_out = random_ffn(13, (80,), 48, 400, jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("sp", "tp"))
    tokens, columns, rows = PartitionSpec("sp"), PartitionSpec(None, "tp"), PartitionSpec("tp", None)
    kernel = functools.partial(
        feedforward_tpu.feedforward, block_m=16, block_f=128, interpret=pltpu.InterpretParams()
    )
    fn = jax.shard_map(
        lambda x, *w: jax.lax.psum(kernel(x, *w), "tp"),
        mesh=mesh, in_specs=(tokens, columns, columns, rows), out_specs=tokens,
    )
    assert_matches_reference(fn, x, w_gate, w_up, w_down, d_out)


def test_impl_pallas_on_cpu_runs_the_interpreted_triton_kernels_and_auto_the_jnp_chunks():
    x, w_gate, w_up, w_down, _ = random_ffn(3, (1, 8), 16, 24, jnp.float32)

    def jaxpr(impl):
        fn = functools.partial(ring_attn.blockwise_feedforward, impl=impl)
        return str(jax.make_jaxpr(fn)(x, w_gate, w_up, w_down))

    assert "ring_attn_ffn_fwd" in jaxpr("pallas")
    assert "ring_attn_tpu_ffn_fwd" in jaxpr("pallas_tpu")
    for impl in ("auto", "xla"):
        assert "pallas_call" not in jaxpr(impl)


def test_interpreted_triton_kernels_under_check_vma_say_what_to_do():
    x, w_gate, w_up, w_down, _ = random_ffn(5, (1, 8), 16, 24, jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:2]), ("sp",))
    fn = jax.shard_map(
        functools.partial(ring_attn.blockwise_feedforward, chunk_size=4, impl="pallas_triton"),
        mesh=mesh, in_specs=(PartitionSpec(None, "sp"), None, None, None), out_specs=PartitionSpec(None, "sp"),
    )
    with pytest.raises(NotImplementedError, match="pass check_vma=False to jax.shard_map"):
        fn(x, w_gate, w_up, w_down)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda a: feedforward_triton.feedforward(*a, block_m=16, block_f=24), r"block_f must be a power of two >= 16"),
        (lambda a: feedforward_triton.feedforward(*a, block_m=16, block_d=8), r"block_d must be a power of two >= 16"),
        (
            lambda a: feedforward_tpu.feedforward(*a, block_m=16, block_f=64),
            r"block_f must be a positive multiple of 128 \(TPU lanes\), got 64",
        ),
        (lambda a: feedforward_tpu.feedforward(*a, block_m=0), r"block_m must be a positive int, got 0"),
        (lambda a: feedforward_triton.feedforward(*a[:3], a[1], block_m=16), r"w_down must have shape \(24, 16\)"),
        (lambda a: pallas_kernels.feedforward(a[0][None], *a[1:], impl="cuda", chunk_size=8), r"unknown impl='cuda'"),
    ],
)
def test_bad_inputs_raise(call, message):
    x, w_gate, w_up, w_down, _ = random_ffn(1, (8,), 16, 24, jnp.float32)
    with pytest.raises(ValueError, match=message):
        call((x, w_gate, w_up, w_down))


# Tokens over "sp", hidden units over "tp": x, w_gate, w_up, w_down.
FFN_SPECS = (PartitionSpec("sp"), PartitionSpec(None, "tp"), PartitionSpec(None, "tp"), PartitionSpec("tp", None))


def _sharded_loss(kernel, mesh):
    """Sum of the feedforward over a ("sp", "tp") mesh, sharded as FFN_SPECS."""
    fn = jax.shard_map(
        lambda x, *w: jax.lax.psum(kernel(x, *w), "tp"), mesh=mesh, in_specs=FFN_SPECS, out_specs=FFN_SPECS[0],
    )
    return lambda *a: fn(*a).astype(jnp.float32).sum()


@pytest.mark.parametrize(
    "M,D,F,tiles,dtype",
    [
        (2 * 2048, LWM_D, 2 * LWM_F, dict(block_m=64), jnp.bfloat16),
        # Blocks of 48 columns (D unpadded, three chunks of 16) and padded tokens and F.
        (2 * 40, 48, 2 * 80, dict(block_m=20, block_f=16, block_d=16), jnp.float32),
    ],
)
def test_kernels_lower_to_triton_for_cuda(M, D, F, tiles, dtype):
    # Exporting for CUDA runs the Pallas -> Triton lowering (power-of-two tiles, atomics, the
    # supported primitives) without a GPU; forward and backward, inside shard_map with the vma
    # check on (each device's weight gradients summed over "sp" by the custom_vjp).
    mesh = abstract_mesh((2, 2), ("sp", "tp"), "cuda")
    kernel = functools.partial(feedforward_triton.feedforward, **tiles)
    fn = jax.jit(jax.value_and_grad(_sharded_loss(kernel, mesh), argnums=(0, 1, 2, 3)))
    args = [(s, dtype) for s in ((M, D), (D, F), (D, F), (F, D))]
    module = exported_module(fn, mesh, "cuda", args, FFN_SPECS)
    for name in ("ring_attn_ffn_fwd", "ring_attn_ffn_bwd"):
        assert f'name = "{name}"' in module, name


@pytest.mark.parametrize(
    "M,D,F,block_m,dtype",
    [(2 * 2048, LWM_D, 2 * LWM_F, 512, jnp.bfloat16), (2 * 40, 48, 2 * 200, 20, jnp.float32)],
)
def test_kernels_lower_to_mosaic_for_tpu(M, D, F, block_m, dtype):
    # Cross-lowering runs Pallas' TPU (Mosaic) lowering on this CPU: block shapes must satisfy the
    # TPU tiling rules and every op in the kernels must have a Mosaic lowering.
    mesh = abstract_mesh((2, 2), ("sp", "tp"), "tpu")
    kernel = functools.partial(feedforward_tpu.feedforward, block_m=block_m)
    fn = jax.jit(jax.value_and_grad(_sharded_loss(kernel, mesh), argnums=(0, 1, 2, 3)))
    args = [(s, dtype) for s in ((M, D), (D, F), (D, F), (F, D))]
    module = exported_module(fn, mesh, "tpu", args, FFN_SPECS)
    for name in ("ring_attn_tpu_ffn_fwd", "ring_attn_tpu_ffn_bwd_dx", "ring_attn_tpu_ffn_bwd_dw"):
        assert name in module, name
