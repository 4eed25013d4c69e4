"""Flash attention backward as Mosaic GPU kernels for Hopper (H100/H200): TMA, mbarriers, wgmma.

The kernel contract of `attention_triton.attention_bwd`: float32 `(dq, dk, dv)` of the forward's
output, the probabilities recomputed from `lse`, the float32 log-sum-exp over every key the rows
saw (in a ring: every step), and `delta` = rowsum(d_out * out); global positions as traced
`q_offset` / `kv_offset` (one int32 operand, so one compiled kernel serves every ring step);
causal / sliding-window / segment masking; grouped-query attention with K/V never repeated.

Two kernels, warp-specialised like the forward (`attention_mgpu`): `wgs` consumer warpgroups (1 or
2), each owning a resident tile of 64 rows (the M of one warpgroup's wgmma), and one producer
warpgroup that only issues TMA copies of the streamed tiles into a double buffer in shared
memory, slot `t % 2`, each copy completing on a per-slot "ready" barrier; before refilling a slot
it waits on that slot's "consumed" barrier, on which every consumer arrives once per tile.
- dq (one CTA per query block x query head x batch element): each consumer holds its Q and dO
  tiles; the producer streams K, K^T and V^T tiles. Per key tile: S = Q K^T,
  P = exp2(S scale log2(e) - lse log2(e)), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
- dk/dv (one CTA per key block x key/value head x batch element): each consumer holds its K and V
  tiles; the producer streams, for each of the G = N // K query heads of the group in turn, the
  Q, Q^T, dO, dO^T, lse and delta tiles of the queries that may see the block, so dk and dv come
  out summed over the group. Keys are the wgmma rows, so everything is computed transposed:
  S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
All products accumulate in float32; P, dS (or their transposes) are rounded to the input dtype in
shared memory, which is where wgmma reads its operands.

Rules the kernels keep:
- Work skipping, as in the forward: the streaming loop covers only the tiles some row of the
  block may see (`kv_tile_range` / `q_tile_range` on the traced positions); a consumer whose own
  tile cannot see a streamed tile, or whose segment ids share no document with it (a per-tile-pair
  table computed outside the kernel), skips the compute with `lax.cond` but still releases the
  slot. Hidden tiles are never computed, so nothing in them (not even NaN) reaches a gradient.
- Every output element is written on every path: the accumulators start at zero and each
  consumer stores its whole tile, whatever it skipped; rows and keys that see nothing get exactly
  0 (their P is selected to 0 after the exponent, where lse may be -inf); padding is sliced off.
- Transposed operands (K^T, V^T, Q^T, dO^T) are made once per call by XLA: Mosaic GPU's interpret
  mode cannot apply a transposed view to a wgmma operand, and for the same reason P and dS go
  through shared memory, and each product lands in a fresh accumulator that is added up.
- Tiles: a resident tile is 64 rows; dq streams key tiles of 128 keys when both head dims are 64
  and 64 otherwise (as the forward), dk/dv streams query tiles of 64 rows (four arrays a step).
  Each kernel takes the first layout whose buffers fit Hopper's 227 KiB of shared memory
  (`mgpu_common.fitting_scratch`): two consumer warpgroups when the resident tiles pair up (as at
  head dim 64), else one; a double buffer, else a single one (dk/dv at MLA's q/k 192, v 128).
- Shapes and dtypes as the forward: q, k, v bfloat16 or float16 (float32 is refused, not
  rounded); v, out, d_out and dv may have a head dim Hv of their own (multi-head latent attention:
  192 / 128); each head dim is zero-padded to a multiple of 64 (above 256, or buffers that do not
  fit even singly, are refused); caller blocks are zero-padded to a multiple of 64 rows.
- Compiled, the kernels lower with Mosaic GPU's lane semantics (pinned, as the forward does);
  layout casts, which interpret mode has no rules for, are applied only when compiling.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention_mgpu import (
    DTYPES,
    SWIZZLE_BYTES,
    WG_ROWS,
    check_head_dims,
    interpret_params,
    kv_tile_cap,
    padded_head_dim,
)
from pallas_kernels.common import LOG2E, match_vma, offsets_operand, scores, through_soft_cap, typed_alike
from pallas_kernels.gpu_tiling import Tiling, kv_tile_range, pad_head, pad_segment_ids, q_tile_range
from pallas_kernels.mgpu_common import fitting_scratch, load, segment_table, streamed_tiles, tiles_seen


def attention_bwd(
    q, k, v, out, lse, d_out, *, delta=None, q_segment_ids=None, kv_segment_ids=None,
    q_offset=0, kv_offset=0, causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv,
    interpret=None,
):
    """Gradients of the attention output: float32 (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv]).

    q: [B, T, N, H], k: [B, S, K, H], v: [B, S, K, Hv] (bfloat16 or float16), out and d_out
    [B, T, N, Hv]; Hv may differ from H (multi-head latent attention: 192 / 128). `lse` [B, N, T]
    is the natural-log log-sum-exp over every key the rows saw (-inf for rows that saw none), and
    `delta` [B, N, T] = rowsum(d_out * out) of the final output, computed here when None (then
    `out` may be None when `delta` is given). Masking as `attention_mgpu.attention_fwd`.
    `interpret`: None compiles for the GPU; True or a `InterpretGPUParams` runs Mosaic GPU's
    interpret mode on any backend.
    """
    B, T, N, H = q.shape
    S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    dtype = jnp.result_type(q, k, v)
    if dtype not in DTYPES:
        raise ValueError(
            f"the Mosaic GPU attention backward takes bfloat16 or float16 q, k and v (wgmma operands), got "
            f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}: cast them, or use impl='pallas_triton' "
            "for float32"
        )
    check_head_dims(H, Hv, "the Mosaic GPU attention backward")
    if isinstance(interpret, bool):
        interpret = interpret_params() if interpret else None
    if delta is None:
        delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    qk_dim, v_dim = padded_head_dim(H), padded_head_dim(Hv)
    # The same padding for both kernels (64-row units); they differ in the tile they stream.
    q_tiling = Tiling.make(T, block_q, WG_ROWS, WG_ROWS)
    kv_tiling = Tiling.make(S, block_kv, WG_ROWS, WG_ROWS)
    kv_stream = Tiling.make(S, block_kv, kv_tile_cap(qk_dim, v_dim), WG_ROWS)
    q_p, do_p = (q_tiling.pad(pad_head(x.astype(dtype), width)) for x, width in ((q, qk_dim), (d_out, v_dim)))
    k_p, v_p = (kv_tiling.pad(pad_head(x.astype(dtype), width)) for x, width in ((k, qk_dim), (v, v_dim)))
    lse_p, delta_p = (q_tiling.pad(x.astype(jnp.float32), axis=2) for x in (lse, delta))
    # The wgmma B operands that are transposes: [B, N, H, T] and [B, K, H, S].
    qt, dot = (jnp.transpose(x, (0, 2, 3, 1)) for x in (q_p, do_p))
    kt, vt = (jnp.transpose(x, (0, 2, 3, 1)) for x in (k_p, v_p))
    q_ids, kv_ids = pad_segment_ids(q_segment_ids, kv_segment_ids, q_tiling, kv_tiling)
    segments = q_ids is not None
    dq_table = segment_table(q_ids, kv_ids, q_tiling, kv_stream) if segments else None
    dkv_table = segment_table(q_ids, kv_ids, q_tiling, kv_tiling) if segments else None
    operands, out_type = typed_alike(
        q_p, do_p, lse_p, delta_p, k_p, v_p, qt, dot, kt, vt, q_ids, kv_ids, dq_table, dkv_table,
        offsets_operand(q_offset, kv_offset),
    )
    q_p, do_p, lse_p, delta_p, k_p, v_p, qt, dot, kt, vt, q_ids, kv_ids, dq_table, dkv_table, offsets = operands
    common = dict(
        B=B, N=N, K=K, qk_dim=qk_dim, v_dim=v_dim, dtype=dtype, causal=causal, window=window, scale=scale,
        logit_soft_cap=logit_soft_cap, segments=segments, out_type=out_type, interpret=interpret,
        shapes=f"q/k head dim {H}, v head dim {Hv}, {dtype}",
    )
    dq = _dq_call(q_tiling=q_tiling, kv_tiling=kv_stream, **common)(
        *_present(q_p, do_p, lse_p, delta_p, k_p, kt, vt, q_ids, kv_ids, dq_table, offsets)
    )
    dk, dv = _dkv_call(q_tiling=q_tiling, kv_tiling=kv_tiling, **common)(
        *_present(k_p, v_p, q_p, qt, do_p, dot, lse_p, delta_p, q_ids, kv_ids, dkv_table, offsets)
    )
    # Compiled for a GPU, plgpu.kernel drops out_type's manual axis type (interpreted, it keeps it).
    dq, dk, dv = (match_vma(x, offsets) for x in (dq, dk, dv))
    return (
        q_tiling.unpad(dq, axis=1)[..., :H], kv_tiling.unpad(dk, axis=1)[..., :H], kv_tiling.unpad(dv, axis=1)[..., :Hv]
    )


def _present(*operands):
    return tuple(x for x in operands if x is not None)


def _call(body, *, out_shape, scratch, grid, grid_names, wgs, interpret, name):
    return plgpu.kernel(
        body,
        out_type=out_shape,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=wgs + 1,
        thread_name="wg",
        # Lane lowering, as the forward (JAX 0.11 makes warpgroup lowering the default).
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
        kernel_name=name,
    )


def _swizzled(dtype):
    return plgpu.TilingTransform((8, SWIZZLE_BYTES // dtype.itemsize)), plgpu.SwizzleTransform(SWIZZLE_BYTES)


def _staging(shape):
    """float32 shared memory from which an accumulator is stored with TMA. Swizzled: JAX 0.12 finds
    no bank-conflict-free way to store a wgmma-layout array into an unswizzled float32 buffer."""
    return plgpu.SMEM(shape, jnp.float32, transforms=_swizzled(jnp.dtype(jnp.float32)))


def _dq_call(
    *, B, N, K, qk_dim, v_dim, dtype, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, segments,
    out_type, interpret, shapes,
):
    tq, tk = WG_ROWS, kv_tiling.tile
    swizzled = _swizzled(dtype)

    def scratch_for(wgs, slots):
        return dict(
            q_smem=plgpu.SMEM((wgs, tq, qk_dim), dtype, transforms=swizzled),
            do_smem=plgpu.SMEM((wgs, tq, v_dim), dtype, transforms=swizzled),
            k_smem=plgpu.SMEM((slots, tk, qk_dim), dtype, transforms=swizzled),
            kt_smem=plgpu.SMEM((slots, qk_dim, tk), dtype, transforms=swizzled),
            vt_smem=plgpu.SMEM((slots, v_dim, tk), dtype, transforms=swizzled),
            ds_smem=plgpu.SMEM((wgs, tq, tk), dtype, transforms=swizzled),
            dq_smem=_staging((wgs, tq, qk_dim)),
            q_ready=plgpu.Barrier(num_barriers=wgs),
            do_ready=plgpu.Barrier(num_barriers=wgs),
            k_ready=plgpu.Barrier(num_barriers=slots),
            kt_ready=plgpu.Barrier(num_barriers=slots),
            vt_ready=plgpu.Barrier(num_barriers=slots),
            consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
        )

    wgs, slots, scratch = fitting_scratch(
        scratch_for, pairs=q_tiling.num_tiles % 2 == 0, reduces=False,
        kernel=f"the Mosaic GPU attention backward's dq kernel at {shapes}",
    )
    body = functools.partial(
        _dq_body, q_tiling=q_tiling, kv_tiling=kv_tiling, wgs=wgs, slots=slots, groups=N // K, dtype=dtype,
        causal=causal, window=window, scale=scale, logit_soft_cap=logit_soft_cap, segments=segments,
        compiled=interpret is None,
    )
    out_shape = jax.ShapeDtypeStruct((B, q_tiling.padded_length, N, qk_dim), jnp.float32, manual_axis_type=out_type)
    return _call(
        body, out_shape=out_shape, scratch=scratch, grid=(q_tiling.num_tiles // wgs, N, B),
        grid_names=("q", "heads", "batch"), wgs=wgs, interpret=interpret, name="ring_attn_bwd_dq_mgpu",
    )


def _dkv_call(
    *, B, N, K, qk_dim, v_dim, dtype, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, segments,
    out_type, interpret, shapes,
):
    tk, tq = WG_ROWS, q_tiling.tile
    swizzled = _swizzled(dtype)

    def scratch_for(wgs, slots):
        scratch = dict(
            k_smem=plgpu.SMEM((wgs, tk, qk_dim), dtype, transforms=swizzled),
            v_smem=plgpu.SMEM((wgs, tk, v_dim), dtype, transforms=swizzled),
            q_smem=plgpu.SMEM((slots, tq, qk_dim), dtype, transforms=swizzled),
            qt_smem=plgpu.SMEM((slots, qk_dim, tq), dtype, transforms=swizzled),
            do_smem=plgpu.SMEM((slots, tq, v_dim), dtype, transforms=swizzled),
            dot_smem=plgpu.SMEM((slots, v_dim, tq), dtype, transforms=swizzled),
            lse_smem=plgpu.SMEM((slots, tq), jnp.float32),
            delta_smem=plgpu.SMEM((slots, tq), jnp.float32),
            ds_smem=plgpu.SMEM((wgs, tk, tq), dtype, transforms=swizzled),
            # dk, then dv when it is as wide, staged for the TMA store.
            out_smem=_staging((wgs, tk, qk_dim)),
            k_ready=plgpu.Barrier(num_barriers=wgs),
            v_ready=plgpu.Barrier(num_barriers=wgs),
            q_ready=plgpu.Barrier(num_barriers=slots),
            qt_ready=plgpu.Barrier(num_barriers=slots),
            do_ready=plgpu.Barrier(num_barriers=slots),
            dot_ready=plgpu.Barrier(num_barriers=slots),
            lse_ready=plgpu.Barrier(num_barriers=slots),
            delta_ready=plgpu.Barrier(num_barriers=slots),
            consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
        )
        if v_dim != qk_dim:
            scratch["dv_smem"] = _staging((wgs, tk, v_dim))
        return scratch

    wgs, slots, scratch = fitting_scratch(
        scratch_for, pairs=kv_tiling.num_tiles % 2 == 0, reduces=False,
        kernel=f"the Mosaic GPU attention backward's dk/dv kernel at {shapes}",
    )
    body = functools.partial(
        _dkv_body, q_tiling=q_tiling, kv_tiling=kv_tiling, wgs=wgs, slots=slots, groups=N // K, dtype=dtype,
        causal=causal, window=window, scale=scale, logit_soft_cap=logit_soft_cap, segments=segments,
        compiled=interpret is None,
    )
    dk, dv = (
        jax.ShapeDtypeStruct((B, kv_tiling.padded_length, K, width), jnp.float32, manual_axis_type=out_type)
        for width in (qk_dim, v_dim)
    )
    return _call(
        body, out_shape=(dk, dv), scratch=scratch, grid=(kv_tiling.num_tiles // wgs, K, B),
        grid_names=("kv", "heads", "batch"), wgs=wgs, interpret=interpret, name="ring_attn_bwd_dkv_mgpu",
    )


# In-kernel helpers shared by both bodies.


def _layout(x, to, *, compiled):
    # Interpret mode has no register layouts (and no rule for layout_cast).
    return plgpu.layout_cast(x, to) if compiled else x


def _registers(ref, idx, to, *, compiled):
    """A small vector (ids, lse, delta) from global or shared memory into registers of layout `to`."""
    return load(ref.at[idx], layout=to) if compiled else ref[idx]


def _matmul(a_smem, b_smem, shape):
    """wgmma of two shared-memory tiles into a fresh float32 accumulator, returned as a value."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _visible(distance, masks, *, causal, window):
    """Bool of visible pairs: `distance` (query minus key position) against causal and window,
    and'ed with `masks` (None entries ignored); None when every pair is visible."""
    masks = [m for m in masks if m is not None]
    if causal:
        masks.append(distance >= 0)
    if window is not None:
        masks.append(distance < window if causal else jnp.abs(distance) < window)
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _produce(steps, slots, fetch, consumed):
    """The producer: fetch(t, slot) issues step t's copies once every consumer released the slot."""

    def step(t, carry):
        slot = lax.rem(t, slots)

        @pl.when(t >= slots)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        fetch(t, slot)
        return carry

    lax.fori_loop(0, steps, step, 0)

    # Take the consumers' last releases too, so that every barrier completion is awaited.
    def drain(t, carry):
        plgpu.barrier_wait(consumed.at[lax.rem(t, slots)])
        return carry

    lax.fori_loop(jnp.maximum(steps - slots, 0), steps, drain, 0)


def _consume(steps, slots, ready, consumed, visible, compute, carry):
    """A consumer: for each step t, wait for its slot's copies, compute(t, slot, carry) when
    visible(t), and release the slot either way."""

    def step(t, carry):
        slot = lax.rem(t, slots)
        for barrier in ready:
            plgpu.barrier_wait(barrier.at[slot])
        carry = lax.cond(visible(t), functools.partial(compute, t, slot), lambda c: c, carry)
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

    return lax.fori_loop(0, steps, step, carry)


def _dq_body(
    *refs, q_tiling, kv_tiling, wgs, slots, groups, dtype, causal, window, scale, logit_soft_cap, segments, compiled,
    q_smem, do_smem, k_smem, kt_smem, vt_smem, ds_smem, dq_smem, q_ready, do_ready, k_ready, kt_ready, vt_ready,
    consumed,
):
    if segments:
        (q_ref, do_ref, lse_ref, delta_ref, k_ref, kt_ref, vt_ref, q_ids_ref, kv_ids_ref, table_ref, offsets_ref,
         dq_ref) = refs
    else:
        q_ref, do_ref, lse_ref, delta_ref, k_ref, kt_ref, vt_ref, offsets_ref, dq_ref = refs
    tq, tk = WG_ROWS, kv_tiling.tile
    qk_dim = q_smem.shape[-1]
    layout = functools.partial(_layout, compiled=compiled)
    registers = functools.partial(_registers, compiled=compiled)
    rows_layout, cols_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    b, n, block = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q")
    wg = lax.axis_index("wg")
    kv_head = lax.div(n, jnp.int32(groups))
    q_offset, kv_offset = offsets_ref[0], offsets_ref[1]

    # [lo, hi) key tiles some query of query tile i may see; its first position and real rows.
    kv_tiles = functools.partial(
        tiles_seen, q_tiling, offset=q_offset, other_tiling=kv_tiling, other_offset=kv_offset,
        tile_range=kv_tile_range, causal=causal, window=window,
    )
    lo, steps = streamed_tiles(kv_tiles, block, wgs)

    @pl.when(wg == wgs)
    def _producer():
        def fetch(t, slot):
            keys = pl.ds((lo + t) * tk, tk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_head, :, keys], kt_smem.at[slot], kt_ready.at[slot])
            plgpu.copy_gmem_to_smem(vt_ref.at[b, kv_head, :, keys], vt_smem.at[slot], vt_ready.at[slot])

        _produce(steps, slots, fetch, consumed)

    @pl.when(wg < wgs)
    def _consumer():
        i = block * wgs + wg
        my_lo, my_hi, q_first, q_count = kv_tiles(i)
        rows = pl.ds(i * tq, tq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_smem.at[wg], q_ready.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, n], do_smem.at[wg], do_ready.at[wg])
        lse2 = registers(lse_ref, (b, n, rows), rows_layout) * LOG2E
        delta = registers(delta_ref, (b, n, rows), rows_layout)
        q_ids = registers(q_ids_ref, (b, rows), rows_layout) if segments else None

        def visible(t):
            j = lo + t
            seen = (j >= my_lo) & (j < my_hi)
            return seen & (table_ref[b, i, j] != 0) if segments else seen

        def compute(t, slot, dq):
            j = lo + t
            kv_start, kv_count = kv_tiling.first_row(j)
            # [tq, tk]: queries are the rows, keys the columns (made per step, not held in registers).
            row = layout(lax.broadcasted_iota(jnp.int32, (tq, tk), 0), plgpu.Layout.WGMMA)
            col = layout(lax.broadcasted_iota(jnp.int32, (tq, tk), 1), plgpu.Layout.WGMMA)
            same_segment = None
            if segments:
                kv_ids = registers(kv_ids_ref, (b, pl.ds(j * tk, tk)), cols_layout)
                q_b = lax.broadcast_in_dim(q_ids, (tq, tk), [0])
                same_segment = q_b == lax.broadcast_in_dim(kv_ids, (tq, tk), [1])
            mask = _visible(
                (q_first - kv_offset - kv_start) + row - col,
                [same_segment, row < q_count if q_tiling.is_padded else None,
                 col < kv_count if kv_tiling.is_padded else None],
                causal=causal, window=window,
            )
            s = scores(_matmul(q_smem.at[wg], kt_smem.at[slot], (tq, tk)), scale=scale,
                       logit_soft_cap=logit_soft_cap, base2=True)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse2, (tq, tk), [0]))
            if mask is not None:
                # After the exponent: a row that saw nothing has lse -inf, and its inf is selected away.
                p = jnp.where(mask, p, 0.0)
            dp = _matmul(do_smem.at[wg], vt_smem.at[slot], (tq, tk))
            ds = p * (dp - lax.broadcast_in_dim(delta, (tq, tk), [0]))
            ds_smem.at[wg][...] = through_soft_cap(ds, s, logit_soft_cap=logit_soft_cap, base2=True).astype(dtype)
            plgpu.commit_smem()  # make the stores visible to wgmma
            return dq + _matmul(ds_smem.at[wg], k_smem.at[slot], (tq, qk_dim))

        dq = layout(jnp.zeros((tq, qk_dim), jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(q_ready.at[wg])
        plgpu.barrier_wait(do_ready.at[wg])
        dq = _consume(steps, slots, (k_ready, kt_ready, vt_ready), consumed, visible, compute, dq)
        dq_smem.at[wg][...] = dq * scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[b, rows, n])
        plgpu.wait_smem_to_gmem(0)


def _dkv_body(
    *refs, q_tiling, kv_tiling, wgs, slots, groups, dtype, causal, window, scale, logit_soft_cap, segments, compiled,
    k_smem, v_smem, q_smem, qt_smem, do_smem, dot_smem, lse_smem, delta_smem, ds_smem, out_smem,
    k_ready, v_ready, q_ready, qt_ready, do_ready, dot_ready, lse_ready, delta_ready, consumed, dv_smem=None,
):
    if segments:
        (k_ref, v_ref, q_ref, qt_ref, do_ref, dot_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, table_ref,
         offsets_ref, dk_ref, dv_ref) = refs
    else:
        k_ref, v_ref, q_ref, qt_ref, do_ref, dot_ref, lse_ref, delta_ref, offsets_ref, dk_ref, dv_ref = refs
    tk, tq = WG_ROWS, q_tiling.tile
    qk_dim, v_dim = k_smem.shape[-1], v_smem.shape[-1]
    layout = functools.partial(_layout, compiled=compiled)
    registers = functools.partial(_registers, compiled=compiled)
    rows_layout, cols_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    b, h, block = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv")
    wg = lax.axis_index("wg")
    q_offset, kv_offset = offsets_ref[0], offsets_ref[1]

    # [lo, hi) query tiles that may see some key of key tile j; its first position and real rows.
    q_tiles = functools.partial(
        tiles_seen, kv_tiling, offset=kv_offset, other_tiling=q_tiling, other_offset=q_offset,
        tile_range=q_tile_range, causal=causal, window=window,
    )
    lo, per_head = streamed_tiles(q_tiles, block, wgs)
    steps = groups * per_head

    def step_tile(t):
        """Step t's (query head, query tile): every tile of the group's first head, then the next."""
        return h * groups + lax.div(t, per_head), lo + lax.rem(t, per_head)

    @pl.when(wg == wgs)
    def _producer():
        def fetch(t, slot):
            n, i = step_tile(t)
            rows = pl.ds(i * tq, tq)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(qt_ref.at[b, n, :, rows], qt_smem.at[slot], qt_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, n], do_smem.at[slot], do_ready.at[slot])
            plgpu.copy_gmem_to_smem(dot_ref.at[b, n, :, rows], dot_smem.at[slot], dot_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, n, rows], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, n, rows], delta_smem.at[slot], delta_ready.at[slot])

        _produce(steps, slots, fetch, consumed)

    @pl.when(wg < wgs)
    def _consumer():
        j = block * wgs + wg
        my_lo, my_hi, kv_first, kv_count = q_tiles(j)
        keys = pl.ds(j * tk, tk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[wg], k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[wg], v_ready.at[wg])
        kv_ids = registers(kv_ids_ref, (b, keys), rows_layout) if segments else None

        def visible(t):
            _, i = step_tile(t)
            seen = (i >= my_lo) & (i < my_hi)
            return seen & (table_ref[b, i, j] != 0) if segments else seen

        def compute(t, slot, carry):
            dk, dv = carry
            _, i = step_tile(t)
            q_start, q_count = q_tiling.first_row(i)
            # [tk, tq]: keys are the rows, queries the columns (made per step, not held in registers).
            row = layout(lax.broadcasted_iota(jnp.int32, (tk, tq), 0), plgpu.Layout.WGMMA)
            col = layout(lax.broadcasted_iota(jnp.int32, (tk, tq), 1), plgpu.Layout.WGMMA)
            same_segment = None
            if segments:
                q_ids = registers(q_ids_ref, (b, pl.ds(i * tq, tq)), cols_layout)
                kv_b = lax.broadcast_in_dim(kv_ids, (tk, tq), [0])
                same_segment = kv_b == lax.broadcast_in_dim(q_ids, (tk, tq), [1])
            mask = _visible(
                (q_offset + q_start - kv_first) + col - row,
                [same_segment, row < kv_count if kv_tiling.is_padded else None,
                 col < q_count if q_tiling.is_padded else None],
                causal=causal, window=window,
            )
            lse2 = lax.broadcast_in_dim(registers(lse_smem, slot, cols_layout) * LOG2E, (tk, tq), [1])
            delta = lax.broadcast_in_dim(registers(delta_smem, slot, cols_layout), (tk, tq), [1])
            st = scores(_matmul(k_smem.at[wg], qt_smem.at[slot], (tk, tq)), scale=scale,
                        logit_soft_cap=logit_soft_cap, base2=True)
            pt = jnp.exp2(st - lse2)
            if mask is not None:
                # After the exponent: a query that saw nothing has lse -inf, and its inf is selected away.
                pt = jnp.where(mask, pt, 0.0)
            ds_smem.at[wg][...] = pt.astype(dtype)
            plgpu.commit_smem()
            dv = dv + _matmul(ds_smem.at[wg], do_smem.at[slot], (tk, v_dim))
            dpt = _matmul(v_smem.at[wg], dot_smem.at[slot], (tk, tq))
            # The dV product has completed, so the P^T buffer takes dS^T.
            ds_smem.at[wg][...] = through_soft_cap(pt * (dpt - delta), st, logit_soft_cap=logit_soft_cap,
                                                   base2=True).astype(dtype)
            plgpu.commit_smem()
            return dk + _matmul(ds_smem.at[wg], q_smem.at[slot], (tk, qk_dim)), dv

        zeros = tuple(layout(jnp.zeros((tk, width), jnp.float32), plgpu.Layout.WGMMA) for width in (qk_dim, v_dim))
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])
        ready = (q_ready, qt_ready, do_ready, dot_ready, lse_ready, delta_ready)
        dk, dv = _consume(steps, slots, ready, consumed, visible, compute, zeros)
        out_smem.at[wg][...] = dk * scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], dk_ref.at[b, keys, h])
        # dv of dk's width reuses its staging buffer once the store has read it; another width has its own.
        if dv_smem is None:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        dv_staging = out_smem if dv_smem is None else dv_smem
        dv_staging.at[wg][...] = dv
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dv_staging.at[wg], dv_ref.at[b, keys, h])
        plgpu.wait_smem_to_gmem(0)
