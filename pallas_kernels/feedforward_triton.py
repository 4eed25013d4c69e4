"""Fused blockwise SwiGLU feedforward as Pallas GPU kernels (Triton lowering), forward and backward.

y = (silu(x @ w_gate) * (x @ w_up)) @ w_down for x [M, D] (M tokens), w_gate / w_up [D, F] and
w_down [F, D] (Blockwise Parallel Transformer, arXiv 2305.19370). The [M, F] hidden activation
never reaches HBM, forward or backward: each program holds one [block_m, block_f] tile of it.

Two kernels, both on a grid of (token tile i, hidden tile f) programs:
- forward ("ring_attn_ffn_fwd"): gate and up of tile (i, f), accumulated over D in chunks of
  `block_d`; the hidden tile h = silu(gate) * up; then h @ w_down[f] added into the rows of
  tile i of the output, one [block_m, block_d] chunk at a time.
- backward ("ring_attn_ffn_bwd"): gate, up and dh = dy @ w_down[f]^T recomputed for tile (i, f)
  (nothing of the hidden is stored by the forward), then that program's share of all four
  gradients added in: dx rows i (dgate @ w_gate^T + dup @ w_up^T), dw_gate and dw_up columns f
  (x^T @ dgate, x^T @ dup) and dw_down rows f (h^T @ dy). One recompute serves all four, where
  separate dx and weight-gradient kernels would each recompute gate, up and dh.

The sums over hidden tiles (for y and dx) and over token tiles (for the weight gradients) are
float32 atomic adds into zero-initialised float32 buffers: a GPU program keeps its accumulators
in registers, and at LLaMA widths (D = 4096) neither a [block_m, D] output tile nor a
[D, block_f] gradient tile fits there, nor would a whole-D operand fit Triton's shared memory; so
every matmul has a `block_d` side and each result chunk goes out as soon as it is made. The F
tiles of one token tile run in parallel (decoding, with one token tile, still fills the GPU).
On a GPU the order of those float32 additions varies, and with it the last bits of the result;
the interpreter adds in grid order. The float32 results are cast to x's / the weights' dtype.

Triton needs power-of-two tile dimensions of at least 16: tokens, D and F are zero-padded to
multiples of their tiles. Zero padding is exact, so nothing is masked: a zero row of x or
column of w_gate / w_up gives gate = up = 0 and silu(0) * 0 = 0, and zero rows of dy give
zero gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import matmul_precision, typed_alike
from pallas_kernels.feedforward_fused import differentiable, pad_to, round_up

# Smallest tensor dimension Triton's dot accepts; every tile is a power of two at least this.
MIN_TILE = 16
# The token tile is the caller's chunk rounded up to a power of two, capped here.
MAX_BLOCK_M = 64
DEFAULT_BLOCK_F = 64
DEFAULT_BLOCK_D = 64
NUM_WARPS = 4
NUM_STAGES = 2


def feedforward(x, w_gate, w_up, w_down, *, block_m, block_f=None, block_d=None, interpret=False):
    """x: [M, D], w_gate / w_up: [D, F], w_down: [F, D] -> [M, D] in x's dtype; differentiable.

    `block_m`: the token tile, rounded up to a power of two in [16, 64] (and not beyond what M
    needs). `block_f` / `block_d`: the hidden tile and the chunk of D every matmul works on,
    powers of two >= 16 (None: 64, or less when F / D is smaller). Gradients come back in each
    input's dtype. `interpret=True` runs the kernels on any backend.
    """
    tiles = _Tiles.make(x, w_gate, w_up, w_down, block_m=block_m, block_f=block_f, block_d=block_d)
    return _feedforward(x, w_gate, w_up, w_down, _Spec(tiles, bool(interpret)))


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Problem and tile sizes; the padded sizes are multiples of the tiles."""

    M: int
    D: int
    F: int
    block_m: int
    block_f: int
    block_d: int

    @classmethod
    def make(cls, x, w_gate, w_up, w_down, *, block_m, block_f, block_d):
        if x.ndim != 2 or w_gate.ndim != 2:
            raise ValueError(f"expected x [M, D] and w_gate [D, F]; got {x.shape} and {w_gate.shape}")
        (M, D), F = x.shape, w_gate.shape[1]
        for name, w, shape in (("w_gate", w_gate, (D, F)), ("w_up", w_up, (D, F)), ("w_down", w_down, (F, D))):
            if w.shape != shape:
                raise ValueError(f"{name} must have shape {shape} for x with {D=} and w_gate with {F=}, got {w.shape}")
        if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m <= 0:
            raise ValueError(f"block_m must be a positive int, got {block_m!r}")
        block_m = max(MIN_TILE, min(_next_power_of_two(block_m), MAX_BLOCK_M, _next_power_of_two(M)))
        return cls(
            M, D, F, block_m,
            _checked_tile("block_f", block_f, DEFAULT_BLOCK_F, F),
            _checked_tile("block_d", block_d, DEFAULT_BLOCK_D, D),
        )

    @property
    def padded(self):
        """(M, D, F) rounded up to multiples of their tiles."""
        return (round_up(self.M, self.block_m), round_up(self.D, self.block_d), round_up(self.F, self.block_f))

    @property
    def grid(self):
        Mp, _, Fp = self.padded
        return Mp // self.block_m, Fp // self.block_f


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call: a hashable `custom_vjp` non-differentiable argument."""

    tiles: _Tiles
    interpret: bool


def _next_power_of_two(n):
    return 1 << max(n - 1, 0).bit_length()


def _checked_tile(name, value, default, size):
    if value is None:
        return max(MIN_TILE, min(default, _next_power_of_two(size)))
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_TILE or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_TILE} (a Triton tile), got {value!r}")
    return value


def _forward(x, w_gate, w_up, w_down, spec):
    t = spec.tiles
    Mp, Dp, Fp = t.padded
    dtype = jnp.result_type(x, w_gate, w_up, w_down)
    out = jnp.zeros((Mp, Dp), jnp.float32)
    operands, vma = typed_alike(
        pad_to(x, dtype, Mp, Dp), pad_to(w_gate, dtype, Dp, Fp), pad_to(w_up, dtype, Dp, Fp),
        pad_to(w_down, dtype, Fp, Dp), out,
    )
    out = _fwd_call(t, precision=matmul_precision(dtype), vma=vma, interpret=spec.interpret)(*operands)
    return out[: t.M, : t.D].astype(x.dtype)


def _backward(x, w_gate, w_up, w_down, dy, spec):
    """float32 (dx [M, D], dw_gate [D, F], dw_up [D, F], dw_down [F, D])."""
    t = spec.tiles
    Mp, Dp, Fp = t.padded
    dtype = jnp.result_type(x, w_gate, w_up, w_down)
    zeros = (
        jnp.zeros((Mp, Dp), jnp.float32), jnp.zeros((Dp, Fp), jnp.float32),
        jnp.zeros((Dp, Fp), jnp.float32), jnp.zeros((Fp, Dp), jnp.float32),
    )
    operands, vma = typed_alike(
        pad_to(x, dtype, Mp, Dp), pad_to(dy, dtype, Mp, Dp), pad_to(w_gate, dtype, Dp, Fp), pad_to(w_up, dtype, Dp, Fp),
        pad_to(w_down, dtype, Fp, Dp), *zeros,
    )
    dx, dw_gate, dw_up, dw_down = _bwd_call(t, precision=matmul_precision(dtype), vma=vma, interpret=spec.interpret)(
        *operands
    )
    M, D, F = t.M, t.D, t.F
    return dx[:M, :D], dw_gate[:D, :F], dw_up[:D, :F], dw_down[:F, :D]


_feedforward = differentiable(_forward, _backward)


def _specs(t):
    """BlockSpecs over the (i, f) grid: token rows of tile i, hidden columns / rows of tile f."""
    _, Dp, _ = t.padded

    def token_rows(i, f):
        return i, 0

    def hidden_columns(i, f):
        return 0, f

    def hidden_rows(i, f):
        return f, 0

    return (
        pl.BlockSpec((t.block_m, Dp), token_rows),  # x, dy, out, dx
        pl.BlockSpec((Dp, t.block_f), hidden_columns),  # w_gate, w_up, dw_gate, dw_up
        pl.BlockSpec((t.block_f, Dp), hidden_rows),  # w_down, dw_down
    )


def _fwd_call(t, *, precision, vma, interpret):
    Mp, Dp, _ = t.padded
    tokens, columns, rows = _specs(t)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, block_d=t.block_d, precision=precision),
        grid=t.grid,
        in_specs=[tokens, columns, columns, rows, tokens],
        out_specs=tokens,
        out_shape=jax.ShapeDtypeStruct((Mp, Dp), jnp.float32, manual_axis_type=vma),
        # The zeros operand is the accumulator the programs add into.
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="ring_attn_ffn_fwd",
    )


def _bwd_call(t, *, precision, vma, interpret):
    Mp, Dp, Fp = t.padded
    tokens, columns, rows = _specs(t)
    out_shape = [
        jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=vma)
        for shape in ((Mp, Dp), (Dp, Fp), (Dp, Fp), (Fp, Dp))  # dx, dw_gate, dw_up, dw_down
    ]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, block_d=t.block_d, precision=precision),
        grid=t.grid,
        in_specs=[tokens, tokens, columns, columns, rows, tokens, columns, columns, rows],
        out_specs=[tokens, columns, columns, rows],
        out_shape=out_shape,
        input_output_aliases={5: 0, 6: 1, 7: 2, 8: 3},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="ring_attn_ffn_bwd",
    )


def _dot(a, b, *, contract, precision):
    """a @ b contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _sigmoid(g):
    # exp(-g) overflows to inf for very negative g, and 1 / inf = 0: no NaN.
    return 1.0 / (1.0 + jnp.exp(-g))


def _gate_up(x_ref, w_gate_ref, w_up_ref, dy_ref, w_down_ref, *, block_d, precision):
    """gate, up (and with dy, dh = dy @ w_down^T) of one [block_m, block_f] tile, float32,
    accumulated over D a `block_d` chunk at a time."""
    block_m, block_f = x_ref.shape[0], w_gate_ref.shape[1]
    with_dh = dy_ref is not None

    def chunk(c, carry):
        d = pl.ds(c * block_d, block_d)
        x = x_ref[:, d]  # [block_m, block_d]
        gate = carry[0] + _dot(x, w_gate_ref[d, :], contract=(1, 0), precision=precision)
        up = carry[1] + _dot(x, w_up_ref[d, :], contract=(1, 0), precision=precision)
        if not with_dh:
            return gate, up
        # [block_m, block_d] x [block_f, block_d] -> [block_m, block_f]
        dh = carry[2] + _dot(dy_ref[:, d], w_down_ref[:, d], contract=(1, 1), precision=precision)
        return gate, up, dh

    zeros = jnp.zeros((block_m, block_f), jnp.float32)
    return lax.fori_loop(0, x_ref.shape[1] // block_d, chunk, (zeros,) * (3 if with_dh else 2))


def _fwd_kernel(x_ref, w_gate_ref, w_up_ref, w_down_ref, o_in_ref, o_ref, *, block_d, precision):
    del o_in_ref  # the zeros aliased to o_ref
    gate, up = _gate_up(x_ref, w_gate_ref, w_up_ref, None, None, block_d=block_d, precision=precision)
    h = (gate * _sigmoid(gate) * up).astype(w_down_ref.dtype)  # [block_m, block_f]

    def chunk(c, carry):
        d = pl.ds(c * block_d, block_d)
        plgpu.atomic_add(o_ref, (slice(None), d), _dot(h, w_down_ref[:, d], contract=(1, 0), precision=precision))
        return carry

    lax.fori_loop(0, x_ref.shape[1] // block_d, chunk, 0)


def _bwd_kernel(
    x_ref, dy_ref, w_gate_ref, w_up_ref, w_down_ref,  # inputs
    dx_in_ref, dw_gate_in_ref, dw_up_in_ref, dw_down_in_ref,  # the zeros aliased to the outputs
    dx_ref, dw_gate_ref, dw_up_ref, dw_down_ref,  # outputs
    *, block_d, precision,
):
    del dx_in_ref, dw_gate_in_ref, dw_up_in_ref, dw_down_in_ref
    dtype = x_ref.dtype
    gate, up, dh = _gate_up(x_ref, w_gate_ref, w_up_ref, dy_ref, w_down_ref, block_d=block_d, precision=precision)
    sig = _sigmoid(gate)
    act = gate * sig  # silu(gate)
    h = (act * up).astype(dtype)
    d_up = (dh * act).astype(dtype)
    # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    d_gate = (dh * up * sig * (1.0 + gate * (1.0 - sig))).astype(dtype)  # [block_m, block_f]

    def chunk(c, carry):
        d = pl.ds(c * block_d, block_d)
        x, dy = x_ref[:, d], dy_ref[:, d]  # [block_m, block_d]
        dx = _dot(d_gate, w_gate_ref[d, :], contract=(1, 1), precision=precision)
        dx += _dot(d_up, w_up_ref[d, :], contract=(1, 1), precision=precision)
        plgpu.atomic_add(dx_ref, (slice(None), d), dx)
        # [block_m, block_d] x [block_m, block_f] -> [block_d, block_f]
        plgpu.atomic_add(dw_gate_ref, (d, slice(None)), _dot(x, d_gate, contract=(0, 0), precision=precision))
        plgpu.atomic_add(dw_up_ref, (d, slice(None)), _dot(x, d_up, contract=(0, 0), precision=precision))
        # [block_m, block_f] x [block_m, block_d] -> [block_f, block_d]
        plgpu.atomic_add(dw_down_ref, (slice(None), d), _dot(h, dy, contract=(0, 0), precision=precision))
        return carry

    lax.fori_loop(0, x_ref.shape[1] // block_d, chunk, 0)
