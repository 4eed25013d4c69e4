"""Flash attention forward as a Mosaic GPU kernel for Hopper (H100/H200): TMA, mbarriers, wgmma.

The kernel contract of `attention_xla`: float32 `(out, lse)`, global positions as traced
`q_offset` / `kv_offset` (a small int32 operand, so one compiled kernel serves every ring step),
causal / sliding-window / segment masking, grouped-query attention with K/V never repeated.

Structure (one CTA per query block x query head x batch element, `plgpu.kernel`):
- Warp specialisation: `wgs` consumer warpgroups (1 or 2), each owning a query tile of 64 rows
  (the M of one warpgroup's wgmma), and one producer warpgroup that only issues TMA copies.
- The producer streams the key/value tiles the block's queries may see through a double buffer
  in shared memory: K^T and V tiles land in slot `t % 2`, each completion signalled on a
  per-slot barrier; before refilling a slot it waits on that slot's "consumed" barrier, on which
  every consumer arrives once it is done with the tile. Copies of the next tile overlap the
  compute on the current one. Two consumers when the query tiles pair up and their buffers fit
  shared memory, else one; a single buffer only where one consumer's double buffer would not fit
  (`mgpu_common.fitting_scratch`).
- Each consumer: QK^T = wgmma(Q tile, K^T tile) into a float32 accumulator, masking, online
  softmax in base 2 (exp2), P written to shared memory in the input dtype, then
  wgmma(P, V tile) into float32, rescaled and added to the running output. The result is
  normalised, staged in shared memory and stored with TMA.
- Work skipping: the key-tile loop covers only the tiles some query of the block can see (the
  causal diagonal and the window bound it, per traced offsets); a consumer whose own tile cannot
  see a loaded tile, or whose query ids share no segment with the tile's key ids (a per-tile-pair
  table computed outside the kernel), skips its compute with `lax.cond` but still releases the
  slot. Whole tiles that are masked are therefore never computed.
- GQA: query head n reads key/value head n // (N // K) by index arithmetic in the TMA source.

Shapes and dtypes. wgmma takes 16-bit operands here: q, k, v must be bfloat16 or float16, with
float32 accumulation. float32 inputs are rejected with a ValueError rather than rounded to
bfloat16, because a float32 caller expects float32 accuracy (the project's float32 tolerance is
1e-4 relative; bfloat16 operands give about 1e-2) and silently losing it would be worse than an
error; use impl="pallas_triton" for float32. (wgmma's tf32 mode needs both operands K-major, which
the K^T layout below is not, and would still round to 10 mantissa bits.) The value head dim Hv may
differ from q and k's H (multi-head latent attention: 192 / 128). Each head dim is zero-padded to
a multiple of 64 (a 128-byte swizzled row of 16-bit values) of its own: 64, 128 and 192 run as
is, 80 runs as 128; head dims above 256 (wgmma's widest N) are refused, as are shapes whose
buffers do not fit shared memory even singly buffered, with a ValueError naming the shapes.
Query blocks are cut into tiles of 64 rows, key blocks into tiles of 128 keys (both head dims
64) or 64 keys (either wider); a caller block that is not a multiple of 64 is zero-padded to one,
as `attention_triton` pads to 16.

K is passed to the kernel transposed, [B, K, H, S] (one XLA transpose per call), so that the
QK^T wgmma reads a plain [H, tk] tile: Mosaic GPU's interpret mode, with which this kernel is
tested on CPU, cannot apply a transposed view (`plgpu.transpose_ref`) to a wgmma operand. For the
same reason P goes through shared memory rather than being fed to wgmma from registers, and the
PV product lands in a fresh accumulator that is added to the running output. Layout casts (which
interpret mode has no rules for) are applied only when compiling.

The backward is `attention_mgpu_bwd`. Interpret mode (JAX 0.10) keeps one global simulated GPU
and checks its barriers across devices, so kernels running at once on several devices of a
`shard_map` trip over each other: `ring_attention` refuses a ring of more than one device in
interpret mode. Compiled for the GPU it lowers with Mosaic GPU's lane semantics.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import LN2, match_vma, offsets_operand, scores, typed_alike
from pallas_kernels.gpu_tiling import Tiling, kv_tile_range, pad_head, pad_segment_ids
from pallas_kernels.mgpu_common import fitting_scratch, load, segment_table, streamed_tiles, tiles_seen

# Rows of one warpgroup's wgmma (its M); also the query tile and the unit of padding.
WG_ROWS = 64
# Shared-memory rows are 128 bytes, swizzled: 64 16-bit values, the head-dim and key-tile unit.
SWIZZLE_BYTES = 128
HEAD_DIM_UNIT = 64
# wgmma's widest N: the output, dq, dk and dv are products that wide.
MAX_HEAD_DIM = 256
# Key/value tile elements per shared-memory slot, by the wider of q/k's and v's head dims: 128 keys
# at 64, 64 at 128, and never fewer than 64 (a swizzled row of P).
KV_TILE_ELEMENTS = 128 * 64
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def interpret_params():
    """Mosaic GPU interpret mode's parameters (a private JAX module; imported only when used)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def padded_head_dim(H):
    """H zero-padded to whole swizzled rows (80 -> 128, MLA's 192 as is)."""
    return -(-H // HEAD_DIM_UNIT) * HEAD_DIM_UNIT


def kv_tile_cap(qk_dim, v_dim):
    """Keys per streamed key/value tile, for padded head dims."""
    return max(HEAD_DIM_UNIT, KV_TILE_ELEMENTS // max(qk_dim, v_dim))


def check_head_dims(H, Hv, kernel):
    if max(H, Hv) > MAX_HEAD_DIM:
        raise ValueError(f"{kernel} takes head dims up to {MAX_HEAD_DIM}, got q/k {H}, v {Hv}")


def attention_fwd(
    q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0,
    causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv, interpret=None,
):
    """q: [B, T, N, H], k: [B, S, K, H], v: [B, S, K, Hv] -> (out [B, T, N, Hv] f32, lse [B, N, T] f32).

    q, k and v are bfloat16 or float16; Hv may differ from H (multi-head latent attention: 192 / 128).
    A query at global position i sees the key at j when causal allows (i >= j), the segment ids
    match, and within a `window`: 0 <= i - j < window (causal) or |i - j| < window. Rows that see
    no key give out 0 and lse -inf. `interpret`: None compiles for the GPU; True or a
    `InterpretGPUParams` runs Mosaic GPU's interpret mode on any backend.
    """
    B, T, N, H = q.shape
    S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    dtype = jnp.result_type(q, k, v)
    if dtype not in DTYPES:
        raise ValueError(
            f"the Mosaic GPU attention kernel takes bfloat16 or float16 q, k and v (wgmma operands), got "
            f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}: cast them, or use impl='pallas_triton' "
            "for float32"
        )
    check_head_dims(H, Hv, "the Mosaic GPU attention kernel")
    if isinstance(interpret, bool):
        interpret = interpret_params() if interpret else None
    qk_dim, v_dim = padded_head_dim(H), padded_head_dim(Hv)
    q_tiling = Tiling.make(T, block_q, WG_ROWS, WG_ROWS)
    kv_tiling = Tiling.make(S, block_kv, kv_tile_cap(qk_dim, v_dim), HEAD_DIM_UNIT)
    q_p = q_tiling.pad(pad_head(q.astype(dtype), qk_dim))
    k_p = kv_tiling.pad(pad_head(k.astype(dtype), qk_dim))
    v_p = kv_tiling.pad(pad_head(v.astype(dtype), v_dim))
    kt = jnp.transpose(k_p, (0, 2, 3, 1))  # [B, K, H, S]: the QK^T wgmma's B operand tiles
    q_ids, kv_ids = pad_segment_ids(q_segment_ids, kv_segment_ids, q_tiling, kv_tiling)
    segments = q_ids is not None
    table = segment_table(q_ids, kv_ids, q_tiling, kv_tiling) if segments else None
    operands, out_type = typed_alike(q_p, kt, v_p, q_ids, kv_ids, table, offsets_operand(q_offset, kv_offset))
    call = _fwd_call(
        B=B, N=N, K=K, qk_dim=qk_dim, v_dim=v_dim, dtype=dtype, q_tiling=q_tiling, kv_tiling=kv_tiling,
        causal=causal, window=window, scale=scale, logit_soft_cap=logit_soft_cap, segments=segments,
        out_type=out_type, interpret=interpret, shapes=f"q/k head dim {H}, v head dim {Hv}, {dtype}",
    )
    out, lse = call(*(x for x in operands if x is not None))
    # Compiled for a GPU, plgpu.kernel drops out_type's manual axis type (interpreted, it keeps it).
    out, lse = (match_vma(x, operands[0]) for x in (out, lse))
    return q_tiling.unpad(out, axis=1)[..., :Hv], q_tiling.unpad(lse, axis=2)


def _fwd_call(
    *, B, N, K, qk_dim, v_dim, dtype, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, segments,
    out_type, interpret, shapes,
):
    tq, tk = WG_ROWS, kv_tiling.tile
    T_p = q_tiling.padded_length
    swizzled = (plgpu.TilingTransform((8, SWIZZLE_BYTES // dtype.itemsize)), plgpu.SwizzleTransform(SWIZZLE_BYTES))
    swizzled_f32 = (plgpu.TilingTransform((8, SWIZZLE_BYTES // 4)), plgpu.SwizzleTransform(SWIZZLE_BYTES))

    def scratch_for(wgs, slots):
        return dict(
            q_smem=plgpu.SMEM((wgs, tq, qk_dim), dtype, transforms=swizzled),
            kt_smem=plgpu.SMEM((slots, qk_dim, tk), dtype, transforms=swizzled),
            v_smem=plgpu.SMEM((slots, tk, v_dim), dtype, transforms=swizzled),
            p_smem=plgpu.SMEM((wgs, tq, tk), dtype, transforms=swizzled),
            # Swizzled like the 16-bit tiles: newer Mosaic GPU finds no bank-conflict-free store otherwise.
            o_smem=plgpu.SMEM((wgs, tq, v_dim), jnp.float32, transforms=swizzled_f32),
            lse_smem=plgpu.SMEM((wgs, tq), jnp.float32),
            q_ready=plgpu.Barrier(num_barriers=wgs),
            k_ready=plgpu.Barrier(num_barriers=slots),
            v_ready=plgpu.Barrier(num_barriers=slots),
            consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
        )

    # The softmax's row max and sum are reductions, which take shared memory of their own.
    wgs, slots, scratch = fitting_scratch(
        scratch_for, pairs=q_tiling.num_tiles % 2 == 0, reduces=True,
        kernel=f"the Mosaic GPU attention kernel at {shapes}",
    )
    body = functools.partial(
        _fwd_body, q_tiling=q_tiling, kv_tiling=kv_tiling, wgs=wgs, slots=slots, groups=N // K, dtype=dtype,
        causal=causal, window=window, scale=scale, logit_soft_cap=logit_soft_cap, segments=segments,
        compiled=interpret is None,
    )
    out_shape = (
        jax.ShapeDtypeStruct((B, T_p, N, v_dim), jnp.float32, manual_axis_type=out_type),
        jax.ShapeDtypeStruct((B, N, T_p), jnp.float32, manual_axis_type=out_type),
    )
    return plgpu.kernel(
        body,
        out_type=out_shape,
        scratch_types=scratch,
        grid=(q_tiling.num_tiles // wgs, N, B),
        grid_names=("q", "heads", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        # Lane lowering, as verified with JAX 0.10 (JAX 0.11 makes warpgroup lowering the default).
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
        kernel_name="ring_attn_fwd_mgpu",
    )


def _fwd_body(
    *refs, q_tiling, kv_tiling, wgs, slots, groups, dtype, causal, window, scale, logit_soft_cap, segments, compiled,
    q_smem, kt_smem, v_smem, p_smem, o_smem, lse_smem, q_ready, k_ready, v_ready, consumed,
):
    if segments:
        q_ref, kt_ref, v_ref, q_ids_ref, kv_ids_ref, table_ref, offsets_ref, o_ref, lse_ref = refs
    else:
        q_ref, kt_ref, v_ref, offsets_ref, o_ref, lse_ref = refs
    tq, tk = WG_ROWS, kv_tiling.tile
    v_dim = v_smem.shape[-1]

    def layout(x, to):
        # Interpret mode has no register layouts (and no rule for layout_cast).
        return plgpu.layout_cast(x, to) if compiled else x

    def load_ids(ref, idx, to):
        """Segment ids from global memory straight into registers of layout `to` (not a TMA:
        the ids are small, and read once per tile)."""
        return load(ref.at[idx], layout=to) if compiled else ref[idx]

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
        def load(t, carry):
            slot = lax.rem(t, slots)

            @pl.when(t >= slots)
            def _():
                plgpu.barrier_wait(consumed.at[slot])

            keys = pl.ds((lo + t) * tk, tk)
            plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_head, :, keys], kt_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_ready.at[slot])
            return carry

        lax.fori_loop(0, steps, load, 0)

        # Take the consumers' last releases too, so that every barrier completion is awaited.
        def drain(t, carry):
            plgpu.barrier_wait(consumed.at[lax.rem(t, slots)])
            return carry

        lax.fori_loop(jnp.maximum(steps - slots, 0), steps, drain, 0)

    @pl.when(wg < wgs)
    def _consumer():
        i = block * wgs + wg
        my_lo, my_hi, q_first, q_count = kv_tiles(i)
        q_rows = pl.ds(i * tq, tq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, n], q_smem.at[wg], q_ready.at[wg])
        q_ids = load_ids(q_ids_ref, (b, q_rows), rows_layout) if segments else None
        row = layout(lax.broadcasted_iota(jnp.int32, (tq, tk), 0), plgpu.Layout.WGMMA)
        col = layout(lax.broadcasted_iota(jnp.int32, (tq, tk), 1), plgpu.Layout.WGMMA)

        def mask_for(j):
            """[tq, tk] bool of visible (query, key) pairs of key tile j, or None if all are."""
            kv_start, kv_count = kv_tiling.first_row(j)
            masks = []
            if causal or window is not None:
                distance = (q_first - kv_offset - kv_start) + row - col
            if causal:
                masks.append(distance >= 0)
            if window is not None:
                masks.append(distance < window if causal else jnp.abs(distance) < window)
            if segments:
                kv_ids = load_ids(kv_ids_ref, (b, pl.ds(j * tk, tk)), cols_layout)
                q_b = lax.broadcast_in_dim(q_ids, (tq, tk), [0])
                masks.append(q_b == lax.broadcast_in_dim(kv_ids, (tq, tk), [1]))
            if q_tiling.is_padded:
                masks.append(row < q_count)
            if kv_tiling.is_padded:
                masks.append(col < kv_count)
            return functools.reduce(jnp.logical_and, masks) if masks else None

        def matmul(a_smem, b_smem, shape):
            def run(acc_ref):
                plgpu.wgmma(acc_ref, a_smem, b_smem)
                return acc_ref[...]

            return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

        def compute(slot, j, carry):
            acc, m, l = carry
            s = scores(matmul(q_smem.at[wg], kt_smem.at[slot], (tq, tk)), scale=scale,
                       logit_soft_cap=logit_soft_cap, base2=True)
            mask = mask_for(j)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, (tq, tk), [0]))
            alpha = jnp.exp2(m - m_safe)
            l = alpha * l + p.sum(axis=1)
            p_smem.at[wg][...] = p.astype(dtype)
            plgpu.commit_smem()  # make the stores visible to wgmma
            pv = matmul(p_smem.at[wg], v_smem.at[slot], (tq, v_dim))
            return acc * lax.broadcast_in_dim(alpha, (tq, v_dim), [0]) + pv, m_new, l

        def step(t, carry):
            slot = lax.rem(t, slots)
            j = lo + t
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            visible = (j >= my_lo) & (j < my_hi)
            if segments:
                visible = visible & (table_ref[b, i, j] != 0)
            carry = lax.cond(visible, functools.partial(compute, slot, j), lambda c: c, carry)
            plgpu.barrier_arrive(consumed.at[slot])
            return carry

        acc = layout(jnp.zeros((tq, v_dim), jnp.float32), plgpu.Layout.WGMMA)
        m = layout(jnp.full((tq,), -jnp.inf, jnp.float32), rows_layout)
        l = layout(jnp.zeros((tq,), jnp.float32), rows_layout)
        plgpu.barrier_wait(q_ready.at[wg])
        acc, m, l = lax.fori_loop(0, steps, step, (acc, m, l))

        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        inv = jnp.where(seen, 1.0 / l_safe, 0.0)
        o_smem.at[wg][...] = acc * lax.broadcast_in_dim(inv, (tq, v_dim), [0])
        lse_smem.at[wg][...] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, q_rows, n])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, q_rows])
        plgpu.wait_smem_to_gmem(0)
