"""Which implementation runs the per-shard compute, decided at call time, never at import."""

from typing import Literal

import jax

from pallas_kernels import attention_tpu, attention_triton, attention_xla, feedforward_xla

Impl = Literal["auto", "pallas", "pallas_triton", "pallas_tpu", "xla"]
IMPLS = ("auto", "pallas", "pallas_triton", "pallas_tpu", "xla")

# Resolved kernels: what runs, and whether it runs in Pallas interpret mode.
XLA, TRITON, TRITON_INTERPRET, TPU, TPU_INTERPRET = "xla", "triton", "triton_interpret", "tpu", "tpu_interpret"
INTERPRETED = (TRITON_INTERPRET, TPU_INTERPRET)


def resolve_impl(impl: Impl) -> str:
    """The kernel that `impl` names on the default backend, decided now.

    "auto": the Pallas kernels on GPU (Triton lowering) and TPU (Mosaic), the portable jnp path
    ("xla") on CPU. "pallas": the Pallas kernels of this backend; on CPU, the GPU kernels in
    interpret mode. "pallas_triton" / "pallas_tpu": that kernel family, in interpret mode when the
    backend is not its own (how CPU tests run both).
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
        case "tpu" | "tpu_interpret":
            return attention_tpu.attention_bwd(q, k, v, out, lse, d_out, interpret=_tpu_interpret(impl), **kwargs)
    raise ValueError(f"unknown resolved {impl=}")


def _tpu_interpret(impl):
    if impl != TPU_INTERPRET:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def feedforward(x, w_gate, w_up, w_down, *, impl, chunk_size):
    """SwiGLU a chunk at a time. Only the jnp implementation exists in this version: "auto"
    runs it on every backend, and an explicit Pallas request says so instead of running it."""
    match impl:
        case "auto" | "xla":
            return feedforward_xla.feedforward(x, w_gate, w_up, w_down, chunk_size=chunk_size)
        case "pallas" | "pallas_triton" | "pallas_tpu":
            raise NotImplementedError(
                f"{impl=}: this version has no Pallas feedforward kernel; use impl='xla' (or 'auto', which picks it)"
            )
    raise ValueError(f"unknown {impl=}; expected one of {IMPLS}")
