"""Fused blockwise SwiGLU feedforward as TPU Pallas (Mosaic) kernels, forward and backward.

y = (silu(x @ w_gate) * (x @ w_up)) @ w_down for x [M, D] (M tokens), w_gate / w_up [D, F] and
w_down [F, D] (Blockwise Parallel Transformer, arXiv 2305.19370). The [M, F] hidden activation
never reaches HBM, forward or backward: each grid step holds one [block_m, block_f] tile of it in
VMEM. D stays whole in a block (TPU VMEM holds a [block_m, D] tile and [D, block_f] weight
blocks at LLaMA widths); tokens and F are tiled by the grid, the reduced axis innermost
("arbitrary") with a float32 VMEM accumulator:

- forward ("ring_attn_tpu_ffn_fwd"), grid (token tiles, F tiles): acc += h @ w_down[f] with
  h = silu(x @ w_gate[:, f]) * (x @ w_up[:, f]); written in x's dtype after the last F tile.
- dx ("ring_attn_tpu_ffn_bwd_dx"), grid (token tiles, F tiles): gate, up and dh = dy @ w_down[f]^T
  recomputed (the forward stores nothing), acc += dgate @ w_gate[:, f]^T + dup @ w_up[:, f]^T.
- weight gradients ("ring_attn_tpu_ffn_bwd_dw"), grid (F tiles, token tiles): the same
  recompute, and three accumulators: dw_gate[:, f] += x^T @ dgate, dw_up[:, f] += x^T @ dup,
  dw_down[f] += h^T @ dy; written after the last token tile, in the weights' dtype (float32
  when a sum over shard_map axes still follows).

Block shapes follow the TPU tiling: token tiles are multiples of 16 rows (bfloat16 packs two rows
per sublane), D is padded to a multiple of 128 lanes and F to a multiple of `block_f` (itself a
multiple of 128). Padding is with zeros, which is exact: a zero row of x or column of the weights
gives gate = up = 0 and silu(0) * 0 = 0, and zero rows of dy give zero gradients.

VMEM: with whole-D blocks the weight-gradient kernel is the largest, 44-56 MiB at D = 4096 in
bfloat16 with the default 256 x 256 tiles (double-buffered blocks plus three float32
accumulators); the scoped-VMEM limit is raised to what the blocks need, up to 64 MiB. Wider
models need a smaller `block_f` or token tile. Not yet compiled or timed on a TPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import typed_alike
from pallas_kernels.feedforward_fused import differentiable, pad_to, round_up

NUM_LANES = 128
# Token tiles are multiples of this many rows (a bfloat16 (16, 128) tile; float32 needs 8).
SUBLANE_ROWS = 16
# The token tile is the caller's chunk rounded up to SUBLANE_ROWS, capped here.
MAX_BLOCK_M = 256
DEFAULT_BLOCK_F = 256
# Scoped VMEM: Mosaic's default unless the blocks (double-buffered) plus slack need more, and
# then at most what every TPU generation has per core.
_DEFAULT_VMEM_LIMIT = 16 * 1024 * 1024
_MAX_VMEM_LIMIT = 64 * 1024 * 1024
# dot_general dimension numbers: a @ b and a @ b.T.
_NN_DIMS = (((1,), (0,)), ((), ()))
_NT_DIMS = (((1,), (1,)), ((), ()))


def feedforward(x, w_gate, w_up, w_down, *, block_m, block_f=None, interpret=None):
    """x: [M, D], w_gate / w_up: [D, F], w_down: [F, D] -> [M, D] in x's dtype; differentiable.

    `block_m`: the token tile, rounded up to a multiple of 16 and capped at 256 (and not beyond
    what M needs). `block_f`: the hidden tile, a multiple of 128 (None: 256, or F rounded up to
    128 when smaller). Gradients come back in each input's dtype. `interpret`: None compiles for
    TPU; pass `pltpu.InterpretParams()` to run anywhere.
    """
    tiles = _Tiles.make(x, w_gate, w_up, w_down, block_m=block_m, block_f=block_f)
    return _feedforward(x, w_gate, w_up, w_down, _Spec(tiles, interpret))


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Problem and tile sizes; the padded sizes are multiples of the tiles."""

    M: int
    D: int
    F: int
    block_m: int
    block_f: int

    @classmethod
    def make(cls, x, w_gate, w_up, w_down, *, block_m, block_f):
        if x.ndim != 2 or w_gate.ndim != 2:
            raise ValueError(f"expected x [M, D] and w_gate [D, F]; got {x.shape} and {w_gate.shape}")
        (M, D), F = x.shape, w_gate.shape[1]
        for name, w, shape in (("w_gate", w_gate, (D, F)), ("w_up", w_up, (D, F)), ("w_down", w_down, (F, D))):
            if w.shape != shape:
                raise ValueError(f"{name} must have shape {shape} for x with {D=} and w_gate with {F=}, got {w.shape}")
        if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m <= 0:
            raise ValueError(f"block_m must be a positive int, got {block_m!r}")
        block_m = min(round_up(block_m, SUBLANE_ROWS), MAX_BLOCK_M, round_up(M, SUBLANE_ROWS))
        if block_f is None:
            block_f = min(DEFAULT_BLOCK_F, round_up(F, NUM_LANES))
        elif isinstance(block_f, bool) or not isinstance(block_f, int) or block_f <= 0 or block_f % NUM_LANES:
            raise ValueError(f"block_f must be a positive multiple of {NUM_LANES} (TPU lanes), got {block_f!r}")
        return cls(M, D, F, block_m, block_f)

    @property
    def padded(self):
        """(M, D, F) rounded up to multiples of their tiles (D: of 128 lanes)."""
        return round_up(self.M, self.block_m), round_up(self.D, NUM_LANES), round_up(self.F, self.block_f)

    @property
    def num_m_tiles(self):
        return self.padded[0] // self.block_m

    @property
    def num_f_tiles(self):
        return self.padded[2] // self.block_f


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call: a hashable `custom_vjp` non-differentiable argument."""

    tiles: _Tiles
    interpret: object  # None or pltpu.InterpretParams (a frozen dataclass)


def _forward(x, w_gate, w_up, w_down, spec):
    t = spec.tiles
    Mp, Dp, Fp = t.padded
    dtype = jnp.result_type(x, w_gate, w_up, w_down)
    operands, vma = typed_alike(
        pad_to(x, dtype, Mp, Dp), pad_to(w_gate, dtype, Dp, Fp), pad_to(w_up, dtype, Dp, Fp),
        pad_to(w_down, dtype, Fp, Dp),
    )
    out = _build_fwd(t, dtype=dtype, out_dtype=x.dtype, vma=vma, interpret=spec.interpret)(*operands)
    return out[: t.M, : t.D]


def _backward(x, w_gate, w_up, w_down, dy, spec):
    """(dx [M, D], dw_gate [D, F], dw_up [D, F], dw_down [F, D]), accumulated in float32."""
    t = spec.tiles
    Mp, Dp, Fp = t.padded
    dtype = jnp.result_type(x, w_gate, w_up, w_down)
    operands, vma = typed_alike(
        pad_to(x, dtype, Mp, Dp), pad_to(dy, dtype, Mp, Dp), pad_to(w_gate, dtype, Dp, Fp), pad_to(w_up, dtype, Dp, Fp),
        pad_to(w_down, dtype, Fp, Dp),
    )
    # Each gradient leaves its kernel in its input's dtype, or in float32 when a shard_map sum
    # (see `cotangent_like`) still follows.
    dx_dtype, dw_gate_dtype, dw_up_dtype, dw_down_dtype = (
        jnp.float32 if vma.varying - jax.typeof(p).manual_axis_type.varying else p.dtype
        for p in (x, w_gate, w_up, w_down)
    )
    dx = _build_bwd_dx(t, dtype=dtype, out_dtype=dx_dtype, vma=vma, interpret=spec.interpret)(*operands)
    dw_gate, dw_up, dw_down = _build_bwd_dw(
        t, dtype=dtype, out_dtypes=(dw_gate_dtype, dw_up_dtype, dw_down_dtype), vma=vma, interpret=spec.interpret
    )(*operands)
    M, D, F = t.M, t.D, t.F
    return dx[:M, :D], dw_gate[:D, :F], dw_up[:D, :F], dw_down[:F, :D]


_feedforward = differentiable(_forward, _backward)


def _vmem_limit(blocks, scratch):
    """Scoped VMEM for double-buffered `blocks` and single `scratch` (shape, dtype) pairs; None
    (Mosaic's default) when that suffices."""
    nbytes = lambda shape, dtype: shape[0] * shape[1] * jnp.dtype(dtype).itemsize  # noqa: E731
    need = 2 * sum(nbytes(*b) for b in blocks) + sum(nbytes(*s) for s in scratch)
    need += need // 4
    return None if need <= _DEFAULT_VMEM_LIMIT else int(min(need, _MAX_VMEM_LIMIT))


def _compiler_params(dimension_semantics, blocks, scratch):
    return pltpu.CompilerParams(
        dimension_semantics=dimension_semantics, vmem_limit_bytes=_vmem_limit(blocks, scratch)
    )


# Index maps. Grid (i, f) for the forward and dx: token tile i, hidden tile f innermost; grid
# (f, i) for the weight gradients.


def _token_rows(i, f):
    return i, 0


def _hidden_columns(i, f):
    return 0, f


def _hidden_rows(i, f):
    return f, 0


def _dw_token_rows(f, i):
    return i, 0


def _dw_hidden_columns(f, i):
    return 0, f


def _dw_hidden_rows(f, i):
    return f, 0


def _build_fwd(t, *, dtype, out_dtype, vma, interpret):
    Mp, Dp, _ = t.padded
    bm, bf = t.block_m, t.block_f
    tokens = pl.BlockSpec((bm, Dp), _token_rows)
    columns = pl.BlockSpec((Dp, bf), _hidden_columns)
    rows = pl.BlockSpec((bf, Dp), _hidden_rows)
    return pl.pallas_call(
        _fwd_kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Dp), out_dtype, manual_axis_type=vma),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(t.num_m_tiles, t.num_f_tiles),
            in_specs=[tokens, columns, columns, rows],
            out_specs=tokens,
            scratch_shapes=[pltpu.VMEM((bm, Dp), jnp.float32)],
        ),
        compiler_params=_compiler_params(
            ("parallel", "arbitrary"),
            blocks=[((bm, Dp), dtype), ((Dp, bf), dtype), ((Dp, bf), dtype), ((bf, Dp), dtype), ((bm, Dp), out_dtype)],
            scratch=[((bm, Dp), jnp.float32)],
        ),
        interpret=False if interpret is None else interpret,
        name="ring_attn_tpu_ffn_fwd",
    )


def _build_bwd_dx(t, *, dtype, out_dtype, vma, interpret):
    Mp, Dp, _ = t.padded
    bm, bf = t.block_m, t.block_f
    tokens = pl.BlockSpec((bm, Dp), _token_rows)
    columns = pl.BlockSpec((Dp, bf), _hidden_columns)
    rows = pl.BlockSpec((bf, Dp), _hidden_rows)
    return pl.pallas_call(
        _bwd_dx_kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Dp), out_dtype, manual_axis_type=vma),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(t.num_m_tiles, t.num_f_tiles),
            in_specs=[tokens, tokens, columns, columns, rows],
            out_specs=tokens,
            scratch_shapes=[pltpu.VMEM((bm, Dp), jnp.float32)],
        ),
        compiler_params=_compiler_params(
            ("parallel", "arbitrary"),
            blocks=[((bm, Dp), dtype)] * 2 + [((Dp, bf), dtype)] * 3 + [((bm, Dp), out_dtype)],
            scratch=[((bm, Dp), jnp.float32)],
        ),
        interpret=False if interpret is None else interpret,
        name="ring_attn_tpu_ffn_bwd_dx",
    )


def _build_bwd_dw(t, *, dtype, out_dtypes, vma, interpret):
    _, Dp, Fp = t.padded
    bm, bf = t.block_m, t.block_f
    tokens = pl.BlockSpec((bm, Dp), _dw_token_rows)
    columns = pl.BlockSpec((Dp, bf), _dw_hidden_columns)
    rows = pl.BlockSpec((bf, Dp), _dw_hidden_rows)
    return pl.pallas_call(
        _bwd_dw_kernel,
        out_shape=[
            jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=vma)
            for shape, dtype in zip(((Dp, Fp), (Dp, Fp), (Fp, Dp)), out_dtypes)
        ],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(t.num_f_tiles, t.num_m_tiles),
            in_specs=[tokens, tokens, columns, columns, rows],
            out_specs=[columns, columns, rows],
            scratch_shapes=[pltpu.VMEM((Dp, bf), jnp.float32)] * 2 + [pltpu.VMEM((bf, Dp), jnp.float32)],
        ),
        compiler_params=_compiler_params(
            ("parallel", "arbitrary"),
            blocks=[((bm, Dp), dtype)] * 2 + [((Dp, bf), dtype)] * 3 + [((Dp, bf), d) for d in out_dtypes],
            scratch=[((Dp, bf), jnp.float32)] * 3,
        ),
        interpret=False if interpret is None else interpret,
        name="ring_attn_tpu_ffn_bwd_dw",
    )


def _sigmoid(g):
    # exp(-g) overflows to inf for very negative g, and 1 / inf = 0: no NaN.
    return 1.0 / (1.0 + jnp.exp(-g))


def _transposed(a):
    """a.T through float32 (Mosaic transposes 32-bit tiles), back in a's dtype."""
    return a.astype(jnp.float32).T.astype(a.dtype)


def _recompute(x, dy, w_gate, w_up, w_down):
    """The hidden tile h (float32) and the gradients at gate and up (in x's dtype), each
    [block_m, block_f]."""
    gate = lax.dot_general(x, w_gate, _NN_DIMS, preferred_element_type=jnp.float32)
    up = lax.dot_general(x, w_up, _NN_DIMS, preferred_element_type=jnp.float32)
    dh = lax.dot_general(dy, w_down, _NT_DIMS, preferred_element_type=jnp.float32)  # [block_m, block_f]
    sig = _sigmoid(gate)
    act = gate * sig  # silu(gate)
    d_up = dh * act
    # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    return act * up, d_gate.astype(x.dtype), d_up.astype(x.dtype)


def _fwd_kernel(x_ref, w_gate_ref, w_up_ref, w_down_ref, o_ref, acc_scratch_ref):
    f = pl.program_id(1)

    @pl.when(f == 0)
    def _init():
        acc_scratch_ref[...] = jnp.zeros(acc_scratch_ref.shape, jnp.float32)

    x = x_ref[...]  # [block_m, Dp]
    gate = lax.dot_general(x, w_gate_ref[...], _NN_DIMS, preferred_element_type=jnp.float32)
    up = lax.dot_general(x, w_up_ref[...], _NN_DIMS, preferred_element_type=jnp.float32)
    h = (gate * _sigmoid(gate) * up).astype(w_down_ref.dtype)  # [block_m, block_f]
    acc_scratch_ref[...] += lax.dot_general(h, w_down_ref[...], _NN_DIMS, preferred_element_type=jnp.float32)

    @pl.when(f == pl.num_programs(1) - 1)
    def _finish():
        o_ref[...] = acc_scratch_ref[...].astype(o_ref.dtype)


def _bwd_dx_kernel(x_ref, dy_ref, w_gate_ref, w_up_ref, w_down_ref, dx_ref, dx_scratch_ref):
    f = pl.program_id(1)

    @pl.when(f == 0)
    def _init():
        dx_scratch_ref[...] = jnp.zeros(dx_scratch_ref.shape, jnp.float32)

    w_gate, w_up = w_gate_ref[...], w_up_ref[...]
    _, d_gate, d_up = _recompute(x_ref[...], dy_ref[...], w_gate, w_up, w_down_ref[...])
    # [block_m, block_f] x [Dp, block_f] -> [block_m, Dp]
    dx = lax.dot_general(d_gate, w_gate, _NT_DIMS, preferred_element_type=jnp.float32)
    dx_scratch_ref[...] += dx + lax.dot_general(d_up, w_up, _NT_DIMS, preferred_element_type=jnp.float32)

    @pl.when(f == pl.num_programs(1) - 1)
    def _finish():
        dx_ref[...] = dx_scratch_ref[...].astype(dx_ref.dtype)


def _bwd_dw_kernel(
    x_ref, dy_ref, w_gate_ref, w_up_ref, w_down_ref,  # inputs
    dw_gate_ref, dw_up_ref, dw_down_ref,  # outputs
    dw_gate_scratch_ref, dw_up_scratch_ref, dw_down_scratch_ref,
):
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        for ref in (dw_gate_scratch_ref, dw_up_scratch_ref, dw_down_scratch_ref):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    x, dy = x_ref[...], dy_ref[...]  # [block_m, Dp]
    h, d_gate, d_up = _recompute(x, dy, w_gate_ref[...], w_up_ref[...], w_down_ref[...])
    x_t = _transposed(x)  # [Dp, block_m]
    dw_gate_scratch_ref[...] += lax.dot_general(x_t, d_gate, _NN_DIMS, preferred_element_type=jnp.float32)
    dw_up_scratch_ref[...] += lax.dot_general(x_t, d_up, _NN_DIMS, preferred_element_type=jnp.float32)
    h_t = h.T.astype(dy.dtype)  # [block_f, block_m]
    dw_down_scratch_ref[...] += lax.dot_general(h_t, dy, _NN_DIMS, preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_gate_ref[...] = dw_gate_scratch_ref[...].astype(dw_gate_ref.dtype)
        dw_up_ref[...] = dw_up_scratch_ref[...].astype(dw_up_ref.dtype)
        dw_down_ref[...] = dw_down_scratch_ref[...].astype(dw_down_ref.dtype)
