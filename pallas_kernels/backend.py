"""Which kernel runs the per-shard compute: decided for the platform the program is compiled
for, never at import and never by `jax.default_backend()` alone.

Two vocabularies: `Impl`, what a caller asks for ("auto", "pallas", a kernel family or "xla"),
and `Kernel`, what runs (a family, compiled or interpreted), which `resolve_impl` derives from
an `Impl` and a platform. `kernels_for(impl)` gives a `PerPlatform` choice of kernels, which
`PerPlatform.dispatch` turns into `lax.platform_dependent` branches where the platforms differ.
"""

import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

import jax
from jax import lax

from pallas_kernels import (
    attention_mgpu,
    attention_mgpu_bwd,
    attention_tpu,
    attention_triton,
    attention_xla,
    feedforward_tpu,
    feedforward_triton,
    feedforward_xla,
)

Impl = Literal["auto", "pallas", "pallas_triton", "pallas_mgpu", "pallas_tpu", "xla"]
IMPLS = ("auto", "pallas", "pallas_triton", "pallas_mgpu", "pallas_tpu", "xla")


class Kernel(enum.Enum):
    """A resolved kernel: the family, and whether it runs in Pallas interpret mode."""

    XLA = "xla"
    TRITON = "triton"
    TRITON_INTERPRET = "triton_interpret"
    MGPU = "mgpu"
    MGPU_INTERPRET = "mgpu_interpret"
    TPU = "tpu"
    TPU_INTERPRET = "tpu_interpret"

    @property
    def interpreted(self):
        return self in (Kernel.TRITON_INTERPRET, Kernel.MGPU_INTERPRET, Kernel.TPU_INTERPRET)

    @property
    def gpu(self):
        """A GPU kernel family (Triton or Mosaic GPU), compiled or interpreted."""
        return self in (Kernel.TRITON, Kernel.TRITON_INTERPRET, Kernel.MGPU, Kernel.MGPU_INTERPRET)


def resolve_impl(impl: Impl, platform: str | None = None) -> Kernel:
    """The kernel that `impl` names on `platform` ("cpu", "gpu", "tpu"; None: `target_platform()`).

    "auto": the Pallas kernels on GPU (Triton lowering) and TPU (Mosaic), the portable jnp path
    ("xla") on CPU. "pallas": the Pallas kernels of this backend; on CPU, the GPU kernels in
    interpret mode. "pallas_triton" / "pallas_tpu": that kernel family, in interpret mode when the
    backend is not its own (how CPU tests run both). "pallas_mgpu": the Mosaic GPU (Hopper:
    wgmma, TMA) attention forward and backward, compiled on a GPU backend and in Mosaic GPU
    interpret mode elsewhere; 16-bit inputs only. Neither "auto" nor "pallas" chooses it (see the
    README's backend table for why).
    """
    platform = target_platform() if platform is None else platform
    match impl:
        case "xla":
            return Kernel.XLA
        case "auto":
            return {"gpu": Kernel.TRITON, "tpu": Kernel.TPU}.get(platform, Kernel.XLA)
        case "pallas":
            return {"gpu": Kernel.TRITON, "tpu": Kernel.TPU}.get(platform, Kernel.TRITON_INTERPRET)
        case "pallas_triton":
            return Kernel.TRITON if platform == "gpu" else Kernel.TRITON_INTERPRET
        case "pallas_mgpu":
            return Kernel.MGPU if platform == "gpu" else Kernel.MGPU_INTERPRET
        case "pallas_tpu":
            return Kernel.TPU if platform == "tpu" else Kernel.TPU_INTERPRET
        case _:
            raise ValueError(f"unknown {impl=}; expected one of {IMPLS}")


T = TypeVar("T")

# lax.platform_dependent's names for the platforms with their own kernels, and the family each is.
_LOWERING_PLATFORMS = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def target_platform() -> str:
    """The platform a call being traced now will be compiled for, as far as tracing can know:
    that of the mesh in context's devices (abstract H100s or TPU chips on a CPU host compile for
    those), else the default backend's. "any" under a mesh with no devices (an `AbstractMesh`,
    as `jax.export` for several platforms uses): each platform then gets its own kernels."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        return "any" if device is None else device.platform
    return jax.default_backend()


@dataclasses.dataclass(frozen=True)
class PerPlatform(Generic[T]):
    """A value for each platform a program may be lowered for: `default`, except on the
    `lax.platform_dependent` platforms listed in `others`. Hashable when the values are."""

    default: T
    others: tuple[tuple[str, T], ...] = ()

    def map(self, fn: Callable[[T], object]) -> "PerPlatform":
        return PerPlatform(fn(self.default), tuple((p, fn(v)) for p, v in self.others))

    def values(self) -> tuple:
        return (self.default, *(v for _, v in self.others))

    def dispatch(self, fn: Callable, *args):
        """`fn(value, *args)` with the value of the platform being lowered for: traced once per
        distinct value, as `lax.platform_dependent` branches, of which lowering keeps only its
        platform's (no branch at all when every platform has the same value)."""
        others = [(p, v) for p, v in self.others if v != self.default]
        if not others:
            return fn(self.default, *args)
        branches = {}  # one callable per distinct value: platform_dependent merges equal branches
        branch = lambda v: branches.setdefault(v, functools.partial(fn, v))  # noqa: E731
        return lax.platform_dependent(*args, default=branch(self.default), **{p: branch(v) for p, v in others})


def kernels_for(impl: Impl) -> PerPlatform[Kernel]:
    """The kernel `impl` names for the platform being compiled for (`target_platform`): one, or
    under a mesh with no devices, one per platform (the CPU's as the default)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown {impl=}; expected one of {IMPLS}")
    target = target_platform()
    if target != "any":
        return PerPlatform(resolve_impl(impl, target))
    return PerPlatform(
        resolve_impl(impl, "cpu"), tuple((p, resolve_impl(impl, family)) for p, family in _LOWERING_PLATFORMS.items())
    )


def attention_fwd(q, k, v, *, impl: Kernel, **kwargs):
    """The kernel contract's forward: float32 `(out, lse)`; see `attention_xla.attention_fwd`."""
    match impl:
        case Kernel.XLA:
            return attention_xla.attention_fwd(q, k, v, **kwargs)
        case Kernel.TRITON | Kernel.TRITON_INTERPRET:
            return attention_triton.attention_fwd(q, k, v, interpret=impl.interpreted, **kwargs)
        case Kernel.MGPU | Kernel.MGPU_INTERPRET:
            return attention_mgpu.attention_fwd(q, k, v, interpret=impl.interpreted, **kwargs)
        case Kernel.TPU | Kernel.TPU_INTERPRET:
            return attention_tpu.attention_fwd(q, k, v, interpret=_tpu_interpret(impl), **kwargs)
    raise ValueError(f"unknown resolved kernel {impl=}")


def attention_bwd(q, k, v, out, lse, d_out, *, impl: Kernel, **kwargs):
    """The kernel contract's backward: float32 `(dq, dk, dv)`; see `attention_xla.attention_bwd`."""
    match impl:
        case Kernel.XLA:
            return attention_xla.attention_bwd(q, k, v, out, lse, d_out, **kwargs)
        case Kernel.TRITON | Kernel.TRITON_INTERPRET:
            return attention_triton.attention_bwd(q, k, v, out, lse, d_out, interpret=impl.interpreted, **kwargs)
        case Kernel.MGPU | Kernel.MGPU_INTERPRET:
            return attention_mgpu_bwd.attention_bwd(q, k, v, out, lse, d_out, interpret=impl.interpreted, **kwargs)
        case Kernel.TPU | Kernel.TPU_INTERPRET:
            return attention_tpu.attention_bwd(q, k, v, out, lse, d_out, interpret=_tpu_interpret(impl), **kwargs)
    raise ValueError(f"unknown resolved kernel {impl=}")


def _tpu_interpret(impl):
    if impl != Kernel.TPU_INTERPRET:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def feedforward(x, w_gate, w_up, w_down, *, impl: Impl | Kernel, chunk_size):
    """SwiGLU of x [B, L, D] a chunk of tokens at a time; `impl` is a user-facing `Impl` or a
    resolved `Kernel`.

    "xla", and "auto" on every platform: the jnp chunks under `jax.checkpoint` (XLA's own matmuls;
    "auto" moves to the fused kernels where a measurement shows them faster). "pallas",
    "pallas_triton", "pallas_tpu" (resolved as `resolve_impl` does): the fused Pallas kernels over
    the B * L tokens flattened, with `chunk_size` as the token tile, rounded to what the kernel
    family accepts. "pallas_mgpu" (an attention kernel; there is no Mosaic GPU feedforward): the
    Triton feedforward.
    """
    if not isinstance(impl, Kernel):
        kernels = kernels_for("xla" if impl == "auto" else impl)
        return kernels.dispatch(functools.partial(_feedforward, chunk_size=chunk_size), x, w_gate, w_up, w_down)
    return _feedforward(impl, x, w_gate, w_up, w_down, chunk_size=chunk_size)


def _feedforward(kernel, x, w_gate, w_up, w_down, *, chunk_size):
    kernel = {Kernel.MGPU: Kernel.TRITON, Kernel.MGPU_INTERPRET: Kernel.TRITON_INTERPRET}.get(kernel, kernel)
    if kernel == Kernel.XLA:
        return feedforward_xla.feedforward(x, w_gate, w_up, w_down, chunk_size=chunk_size)
    if kernel == Kernel.TRITON_INTERPRET and any(
        jax.typeof(a).manual_axis_type.varying for a in (x, w_gate, w_up, w_down)
    ):
        raise NotImplementedError(
            "the Pallas GPU feedforward runs in interpret mode on this backend, which JAX cannot run inside "
            "jax.shard_map with check_vma=True: pass check_vma=False to jax.shard_map, or use impl='xla' "
            "or impl='pallas_tpu'"
        )
    B, L, D = x.shape
    tokens = x.reshape(B * L, D)
    match kernel:
        case Kernel.TRITON | Kernel.TRITON_INTERPRET:
            y = feedforward_triton.feedforward(tokens, w_gate, w_up, w_down, block_m=chunk_size,
                                               interpret=kernel.interpreted)
        case Kernel.TPU | Kernel.TPU_INTERPRET:
            y = feedforward_tpu.feedforward(tokens, w_gate, w_up, w_down, block_m=chunk_size,
                                            interpret=_tpu_interpret(kernel))
        case _:
            raise ValueError(f"unknown resolved {kernel=}")
    return y.reshape(B, L, D)
