"""Which implementation runs the per-shard compute, decided at call time."""

from typing import Literal

from pallas_kernels import attention_xla, feedforward_xla

Impl = Literal["auto", "pallas", "xla"]
IMPLS = ("auto", "pallas", "xla")


def resolve_impl(impl: Impl) -> str:
    """The concrete implementation for `impl`.

    "auto" is the portable jnp path ("xla") on every backend while this version ships no compiled
    Pallas kernels; "pallas" says so instead of silently running something else.
    """
    match impl:
        case "auto" | "xla":
            return "xla"
        case "pallas":
            raise NotImplementedError(
                "impl='pallas': this version of ring_attn has no Pallas kernels yet; "
                "use impl='xla' (or 'auto', which picks it)"
            )
        case _:
            raise ValueError(f"unknown {impl=}; expected one of {IMPLS}")


def attention_fwd(q, k, v, *, impl, **kwargs):
    """The kernel contract's forward: float32 `(out, lse)`; see `attention_xla.attention_fwd`."""
    match impl:
        case "xla":
            return attention_xla.attention_fwd(q, k, v, **kwargs)
    raise ValueError(f"unknown resolved {impl=}")


def attention_bwd(q, k, v, out, lse, d_out, *, impl, **kwargs):
    """The kernel contract's backward: float32 `(dq, dk, dv)`; see `attention_xla.attention_bwd`."""
    match impl:
        case "xla":
            return attention_xla.attention_bwd(q, k, v, out, lse, d_out, **kwargs)
    raise ValueError(f"unknown resolved {impl=}")


def feedforward(x, w_gate, w_up, w_down, *, impl, chunk_size):
    match impl:
        case "xla":
            return feedforward_xla.feedforward(x, w_gate, w_up, w_down, chunk_size=chunk_size)
    raise ValueError(f"unknown resolved {impl=}")
