"""Which implementation runs the per-shard compute, decided at call time, never at import."""

from typing import Literal

import jax

from pallas_kernels import (
    attention_mgpu, attention_tpu, attention_triton, attention_xla, feedforward_tpu, feedforward_triton,
    feedforward_xla,
)

Impl = Literal["auto", "pallas", "pallas_triton", "pallas_mgpu", "pallas_tpu", "xla"]
IMPLS = ("auto", "pallas", "pallas_triton", "pallas_mgpu", "pallas_tpu", "xla")

# Resolved kernels: what runs, and whether it runs in Pallas interpret mode.
XLA, TRITON, TRITON_INTERPRET, TPU, TPU_INTERPRET = "xla", "triton", "triton_interpret", "tpu", "tpu_interpret"
MGPU, MGPU_INTERPRET = "mgpu", "mgpu_interpret"
INTERPRETED = (TRITON_INTERPRET, MGPU_INTERPRET, TPU_INTERPRET)


def resolve_impl(impl: Impl) -> str:
    """The kernel that `impl` names on the default backend, decided now.

    "auto": the Pallas kernels on GPU (Triton lowering) and TPU (Mosaic), the portable jnp path
    ("xla") on CPU. "pallas": the Pallas kernels of this backend; on CPU, the GPU kernels in
    interpret mode. "pallas_triton" / "pallas_tpu": that kernel family, in interpret mode when the
    backend is not its own (how CPU tests run both). "pallas_mgpu": the Mosaic GPU (Hopper:
    wgmma, TMA) attention forward of `attention_mgpu` with the Triton backward, compiled on a GPU
    backend and in Mosaic GPU interpret mode elsewhere. It has not yet run on a GPU, so neither
    "auto" nor "pallas" chooses it; it takes 16-bit inputs only.
    """
    platform = jax.default_backend()
    match impl:
        case "xla":
            return XLA
        case "auto":
            return {"gpu": TRITON, "tpu": TPU}.get(platform, XLA)
        case "pallas":
            return {"gpu": TRITON, "tpu": TPU}.get(platform, TRITON_INTERPRET)
        case "pallas_triton":
            return TRITON if platform == "gpu" else TRITON_INTERPRET
        case "pallas_mgpu":
            return MGPU if platform == "gpu" else MGPU_INTERPRET
        case "pallas_tpu":
            return TPU if platform == "tpu" else TPU_INTERPRET
        case _:
            raise ValueError(f"unknown {impl=}; expected one of {IMPLS}")


def attention_fwd(q, k, v, *, impl, **kwargs):
    """The kernel contract's forward: float32 `(out, lse)`; see `attention_xla.attention_fwd`."""
    match impl:
        case "xla":
            return attention_xla.attention_fwd(q, k, v, **kwargs)
        case "triton" | "triton_interpret":
            return attention_triton.attention_fwd(q, k, v, interpret=impl == TRITON_INTERPRET, **kwargs)
        case "mgpu" | "mgpu_interpret":
            interpret = attention_mgpu.interpret_params() if impl == MGPU_INTERPRET else None
            return attention_mgpu.attention_fwd(q, k, v, interpret=interpret, **kwargs)
        case "tpu" | "tpu_interpret":
            return attention_tpu.attention_fwd(q, k, v, interpret=_tpu_interpret(impl), **kwargs)
    raise ValueError(f"unknown resolved {impl=}")


def attention_bwd(q, k, v, out, lse, d_out, *, impl, **kwargs):
    """The kernel contract's backward: float32 `(dq, dk, dv)`; see `attention_xla.attention_bwd`."""
    match impl:
        case "xla":
            return attention_xla.attention_bwd(q, k, v, out, lse, d_out, **kwargs)
        case "triton" | "triton_interpret":
            return attention_triton.attention_bwd(q, k, v, out, lse, d_out, interpret=impl == TRITON_INTERPRET, **kwargs)
        case "mgpu" | "mgpu_interpret":
            # The Mosaic GPU kernel is a forward only: the Triton backward follows it.
            return attention_triton.attention_bwd(q, k, v, out, lse, d_out, interpret=impl == MGPU_INTERPRET, **kwargs)
        case "tpu" | "tpu_interpret":
            return attention_tpu.attention_bwd(q, k, v, out, lse, d_out, interpret=_tpu_interpret(impl), **kwargs)
    raise ValueError(f"unknown resolved {impl=}")


def _tpu_interpret(impl):
    if impl != TPU_INTERPRET:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def feedforward(x, w_gate, w_up, w_down, *, impl, chunk_size):
    """SwiGLU of x [B, L, D] a chunk of tokens at a time; `impl` is a user-facing `Impl` or an
    already resolved kernel name.

    "xla", and "auto" on every backend: the jnp chunks under `jax.checkpoint` (XLA's own matmuls;
    the fused kernels have not yet been timed against them on a GPU or TPU). "pallas",
    "pallas_triton", "pallas_tpu" (resolved as `resolve_impl` does; "triton", "tpu" and their
    "_interpret" forms directly): the fused Pallas kernels over the B * L tokens flattened, with
    `chunk_size` as the token tile, rounded to what the kernel family accepts. "pallas_mgpu" (an
    attention kernel; there is no Mosaic GPU feedforward): the Triton feedforward.
    """
    if impl in (XLA, TRITON, TRITON_INTERPRET, TPU, TPU_INTERPRET, MGPU, MGPU_INTERPRET):
        kernel = impl
    else:
        kernel = resolve_impl("xla" if impl == "auto" else impl)
    kernel = {MGPU: TRITON, MGPU_INTERPRET: TRITON_INTERPRET}.get(kernel, kernel)
    if kernel == XLA:
        return feedforward_xla.feedforward(x, w_gate, w_up, w_down, chunk_size=chunk_size)
    if kernel == TRITON_INTERPRET and any(jax.typeof(a).manual_axis_type.varying for a in (x, w_gate, w_up, w_down)):
        raise NotImplementedError(
            "the Pallas GPU feedforward runs in interpret mode on this backend, which JAX cannot run inside "
            "jax.shard_map with check_vma=True: pass check_vma=False to jax.shard_map, or use impl='xla' "
            "or impl='pallas_tpu'"
        )
    B, L, D = x.shape
    tokens = x.reshape(B * L, D)
    match kernel:
        case "triton" | "triton_interpret":
            y = feedforward_triton.feedforward(
                tokens, w_gate, w_up, w_down, block_m=chunk_size, interpret=kernel == TRITON_INTERPRET
            )
        case "tpu" | "tpu_interpret":
            y = feedforward_tpu.feedforward(
                tokens, w_gate, w_up, w_down, block_m=chunk_size, interpret=_tpu_interpret(kernel)
            )
        case _:
            raise ValueError(f"unknown resolved {kernel=}")
    return y.reshape(B, L, D)
