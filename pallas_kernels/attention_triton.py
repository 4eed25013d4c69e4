"""Flash attention as Pallas GPU kernels (Triton lowering): the kernel contract of `attention_xla`.

Same arguments, same results: the forward returns the normalised output and its log-sum-exp,
both float32; the backward recomputes the probabilities from that `lse`. Global positions enter
as `q_offset` / `kv_offset`, which may be traced: they reach the kernels as a small int32 operand,
so one compiled kernel serves every ring step.

Three kernels: the forward (grid: query tile x batch x query head), the dq kernel (the same grid)
and the dk/dv kernel (grid: key tile x batch x key/value head, looping over the query heads of
its group, so dk/dv come out already summed over the group). A query head n reads key/value
head n // (N // K) through the index maps; K/V are never repeated. Key (query) tiles that no
query (key) of the program's tile can see are never loaded: the causal diagonal and the window
bound the loops, and tiles whose segment id ranges are disjoint are skipped by `lax.cond`.

The value head dim Hv may differ from q and k's H (multi-head latent attention: 192 / 128): v,
the output and its gradient have their own width throughout. Triton needs power-of-two tensor
dimensions of at least 16 in `tl.dot`, so each head dim is zero-padded to a power of two of its
own (80 -> 128; MLA's 192 -> 256, its 128 as is), and a block whose largest power-of-two divisor is
below 16 is padded to a multiple of 16 rows; the padding is masked out and sliced off. Blocks
larger than the kernel's tile cap run as several tiles of the cap: the caller's block is the
unit of padding, the tile the unit of work.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import LN2, LOG2E, matmul_precision, offsets_operand, scores, through_soft_cap, typed_alike
from pallas_kernels.gpu_tiling import Tiling, kv_tile_range, pad_head, pad_segment_ids, q_tile_range

# Smallest tensor dimension Triton's dot accepts.
MIN_TILE = 16
# Largest tile per kernel dimension; bigger blocks run as several tiles. The forward keeps its
# query tile resident while streaming keys, so it affords a taller one (for 16-bit inputs).
MAX_TILE = 64
MAX_TILE_Q_FWD = 128
NUM_STAGES = 2


def attention_fwd(
    q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0,
    causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv, interpret=False,
):
    """q: [B, T, N, H], k: [B, S, K, H], v: [B, S, K, Hv] -> (out [B, T, N, Hv] f32, lse [B, N, T] f32).

    A query at global position i sees the key at j when causal allows (i >= j), the segment ids
    match, and within a `window`: 0 <= i - j < window (causal) or |i - j| < window.
    Rows that see no key give out 0 and lse -inf. `interpret=True` runs the kernel on any backend.
    """
    B, T, N, H = q.shape
    S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    dtype = jnp.result_type(q, k, v)
    q_cap = MAX_TILE_Q_FWD if jnp.dtype(dtype).itemsize <= 2 else MAX_TILE
    q_tiling = Tiling.make(T, block_q, q_cap, MIN_TILE)
    kv_tiling = Tiling.make(S, block_kv, MAX_TILE, MIN_TILE)
    qk_dim, v_dim = _padded_head_dim(H), _padded_head_dim(Hv)
    q_p = q_tiling.pad(pad_head(q.astype(dtype), qk_dim))
    k_p = kv_tiling.pad(pad_head(k.astype(dtype), qk_dim))
    v_p = kv_tiling.pad(pad_head(v.astype(dtype), v_dim))
    q_ids, kv_ids = pad_segment_ids(q_segment_ids, kv_segment_ids, q_tiling, kv_tiling)
    operands, out_type = typed_alike(q_p, k_p, v_p, q_ids, kv_ids, offsets_operand(q_offset, kv_offset))
    call = _fwd_call(
        B=B, N=N, K=K, qk_dim=qk_dim, v_dim=v_dim, q_tiling=q_tiling, kv_tiling=kv_tiling, causal=causal,
        window=window, scale=scale, logit_soft_cap=logit_soft_cap, segments=q_ids is not None,
        precision=matmul_precision(dtype), out_type=out_type, interpret=interpret,
    )
    out, lse = call(*operands)
    return q_tiling.unpad(out, axis=1)[..., :Hv], q_tiling.unpad(lse, axis=2)


def attention_bwd(
    q, k, v, out, lse, d_out, *, delta=None, q_segment_ids=None, kv_segment_ids=None,
    q_offset=0, kv_offset=0, causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv,
    interpret=False,
):
    """Gradients of `attention_fwd`'s out: float32 `(dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv])`.

    `out` and `d_out` are [B, T, N, Hv]. `lse` [B, N, T] is the log-sum-exp over every key the rows
    saw (in a ring: all steps), and `delta` [B, N, T] = rowsum(d_out * out) of the final output;
    computed here when None (then `out` may be None when `delta` is given).
    """
    B, T, N, H = q.shape
    S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
    dtype = jnp.result_type(q, k, v)
    if delta is None:
        delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    qk_dim, v_dim = _padded_head_dim(H), _padded_head_dim(Hv)
    q, k = (pad_head(x.astype(dtype), qk_dim) for x in (q, k))
    v, d_out = (pad_head(x.astype(dtype), v_dim) for x in (v, d_out))
    lse, delta = lse.astype(jnp.float32), delta.astype(jnp.float32)

    # Past a padded q/k dim of 128 (MLA's 192 runs as 256), 64-row query tiles need more than the
    # 255 registers a thread may have in the dk/dv kernel, which then spills; 32 rows do not.
    q_cap = MAX_TILE if qk_dim <= 128 else MAX_TILE // 2
    q_tiling, kv_tiling = Tiling.make(T, block_q, q_cap, MIN_TILE), Tiling.make(S, block_kv, MAX_TILE, MIN_TILE)
    q_ids, kv_ids = pad_segment_ids(q_segment_ids, kv_segment_ids, q_tiling, kv_tiling)
    q, d_out, lse, delta = q_tiling.pad(q), q_tiling.pad(d_out), q_tiling.pad(lse, axis=2), q_tiling.pad(delta, axis=2)
    k, v = kv_tiling.pad(k), kv_tiling.pad(v)
    operands, out_type = typed_alike(q, k, v, d_out, lse, delta, q_ids, kv_ids, offsets_operand(q_offset, kv_offset))
    common = dict(
        B=B, N=N, K=K, qk_dim=qk_dim, v_dim=v_dim, causal=causal, window=window, scale=scale,
        logit_soft_cap=logit_soft_cap, segments=q_ids is not None, precision=matmul_precision(dtype), out_type=out_type,
        interpret=interpret,
    )
    # dq: one program per query tile, streaming keys; dk, dv: one program per key tile,
    # streaming the queries of every head in its group.
    dq = _dq_call(q_tiling=q_tiling, kv_tiling=kv_tiling, **common)(*operands)
    dk, dv = _dkv_call(q_tiling=q_tiling, kv_tiling=kv_tiling, **common)(*operands)
    dq = q_tiling.unpad(dq, axis=1)[..., :H]
    return dq, kv_tiling.unpad(dk, axis=1)[..., :H], kv_tiling.unpad(dv, axis=1)[..., :Hv]


def _padded_head_dim(H):
    return max(MIN_TILE, 1 << (H - 1).bit_length())


def _num_warps(qk_dim, v_dim):
    return 4 if max(qk_dim, v_dim) <= 64 else 8


def _fwd_call(
    *, B, N, K, qk_dim, v_dim, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, segments, precision,
    out_type, interpret,
):
    tq, G = q_tiling.tile, N // K
    S_p, T_p = kv_tiling.padded_length, q_tiling.padded_length
    kernel = functools.partial(
        _fwd_kernel, q_tiling=q_tiling, kv_tiling=kv_tiling, causal=causal, window=window,
        scale=scale, logit_soft_cap=logit_soft_cap, precision=precision,
    )
    in_specs = [
        pl.BlockSpec((None, tq, None, qk_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, S_p, None, qk_dim), lambda i, b, n: (b, 0, n // G, 0)),
        pl.BlockSpec((None, S_p, None, v_dim), lambda i, b, n: (b, 0, n // G, 0)),
        pl.BlockSpec((None, tq), lambda i, b, n: (b, i)) if segments else None,
        pl.BlockSpec((None, S_p), lambda i, b, n: (b, 0)) if segments else None,
        pl.BlockSpec((2,), lambda i, b, n: (0,)),
    ]
    out_specs = [
        pl.BlockSpec((None, tq, None, v_dim), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, tq), lambda i, b, n: (b, n, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, T_p, N, v_dim), jnp.float32, manual_axis_type=out_type),
        jax.ShapeDtypeStruct((B, N, T_p), jnp.float32, manual_axis_type=out_type),
    ]
    return pl.pallas_call(
        kernel,
        grid=(q_tiling.num_tiles, B, N),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(qk_dim, v_dim), num_stages=NUM_STAGES),
        interpret=interpret,
        name="ring_attn_fwd",
    )


def _dq_call(
    *, B, N, K, qk_dim, v_dim, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, segments, precision,
    out_type, interpret,
):
    tq, G = q_tiling.tile, N // K
    S_p, T_p = kv_tiling.padded_length, q_tiling.padded_length
    kernel = functools.partial(
        _dq_kernel, q_tiling=q_tiling, kv_tiling=kv_tiling, causal=causal, window=window,
        scale=scale, logit_soft_cap=logit_soft_cap, precision=precision,
    )
    q_tile = pl.BlockSpec((None, tq, None, qk_dim), lambda i, b, n: (b, i, n, 0))
    do_tile = pl.BlockSpec((None, tq, None, v_dim), lambda i, b, n: (b, i, n, 0))
    k_all = pl.BlockSpec((None, S_p, None, qk_dim), lambda i, b, n: (b, 0, n // G, 0))
    v_all = pl.BlockSpec((None, S_p, None, v_dim), lambda i, b, n: (b, 0, n // G, 0))
    row_tile = pl.BlockSpec((None, None, tq), lambda i, b, n: (b, n, i))
    in_specs = [
        q_tile, k_all, v_all, do_tile, row_tile, row_tile,
        pl.BlockSpec((None, tq), lambda i, b, n: (b, i)) if segments else None,
        pl.BlockSpec((None, S_p), lambda i, b, n: (b, 0)) if segments else None,
        pl.BlockSpec((2,), lambda i, b, n: (0,)),
    ]
    return pl.pallas_call(
        kernel,
        grid=(q_tiling.num_tiles, B, N),
        in_specs=in_specs,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct((B, T_p, N, qk_dim), jnp.float32, manual_axis_type=out_type),
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(qk_dim, v_dim), num_stages=NUM_STAGES),
        interpret=interpret,
        name="ring_attn_bwd_dq",
    )


def _dkv_call(
    *, B, N, K, qk_dim, v_dim, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, segments, precision,
    out_type, interpret,
):
    tk, G = kv_tiling.tile, N // K
    S_p, T_p = kv_tiling.padded_length, q_tiling.padded_length
    kernel = functools.partial(
        _dkv_kernel, q_tiling=q_tiling, kv_tiling=kv_tiling, groups=G, causal=causal, window=window,
        scale=scale, logit_soft_cap=logit_soft_cap, precision=precision,
    )
    # The whole query sequence of the G query heads that read key/value head `h`.
    q_group = pl.BlockSpec((None, T_p, G, qk_dim), lambda j, b, h: (b, 0, h, 0))
    do_group = pl.BlockSpec((None, T_p, G, v_dim), lambda j, b, h: (b, 0, h, 0))
    k_tile = pl.BlockSpec((None, tk, None, qk_dim), lambda j, b, h: (b, j, h, 0))
    v_tile = pl.BlockSpec((None, tk, None, v_dim), lambda j, b, h: (b, j, h, 0))
    row_group = pl.BlockSpec((None, G, T_p), lambda j, b, h: (b, h, 0))
    in_specs = [
        q_group, k_tile, v_tile, do_group, row_group, row_group,
        pl.BlockSpec((None, T_p), lambda j, b, h: (b, 0)) if segments else None,
        pl.BlockSpec((None, tk), lambda j, b, h: (b, j)) if segments else None,
        pl.BlockSpec((2,), lambda j, b, h: (0,)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, S_p, K, width), jnp.float32, manual_axis_type=out_type) for width in (qk_dim, v_dim)
    ]
    return pl.pallas_call(
        kernel,
        grid=(kv_tiling.num_tiles, B, K),
        in_specs=in_specs,
        out_specs=[k_tile, v_tile],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(qk_dim, v_dim), num_stages=NUM_STAGES),
        interpret=interpret,
        name="ring_attn_bwd_dkv",
    )


def _dot(a, b, *, contract, precision):
    """a @ b contracting a's axis contract[0] with b's axis contract[1], float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _capped_scores(q, k, scale, logit_soft_cap, precision):
    """[tq, tk] scores of q against k in base-2 units (the kernels' exp2), soft-capped if asked."""
    dot = _dot(q, k, contract=(1, 1), precision=precision)
    return scores(dot, scale=scale, logit_soft_cap=logit_soft_cap, base2=True)


def _mask(q_pos, kv_pos, q_real, kv_real, q_ids, kv_ids, *, causal, window):
    """[tq, tk] bool of visible (query, key) pairs, or None when every pair is visible."""
    masks = []
    if causal or window is not None:
        distance = q_pos[:, None] - kv_pos[None, :]
    if causal:
        masks.append(distance >= 0)
    if window is not None:
        masks.append(distance < window if causal else jnp.abs(distance) < window)
    if q_ids is not None:
        masks.append(q_ids[:, None] == kv_ids[None, :])
    if q_real is not None:
        masks.append(q_real[:, None])
    if kv_real is not None:
        masks.append(kv_real[None, :])
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _ids_overlap(q_ids, kv_ids):
    # Disjoint id ranges cannot match; exact for the sorted ids that packing produces.
    return (jnp.min(q_ids) <= jnp.max(kv_ids)) & (jnp.min(kv_ids) <= jnp.max(q_ids))


def _run_if(visible, compute, carry):
    """compute(carry) when `visible` (None: always), else carry unchanged."""
    if visible is None:
        return compute(carry)
    return lax.cond(visible, compute, lambda c: c, carry)


def _fwd_kernel(
    q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, offsets_ref, o_ref, lse_ref,
    *, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, precision,
):
    tq, tk = q_tiling.tile, kv_tiling.tile
    q_offset, kv_offset = offsets_ref[0], offsets_ref[1]
    first, count, q_real = q_tiling.rows(pl.program_id(0))
    q_first = q_offset + first
    q_pos = q_first + jnp.arange(tq, dtype=jnp.int32)
    q = q_ref[...]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]

    def kv_step(j, carry):
        kv_start, _, kv_real = kv_tiling.rows(j)
        kv_ids = None if kv_ids_ref is None else kv_ids_ref[pl.ds(j * tk, tk)]

        def compute(carry):
            acc, m, l = carry
            k = k_ref[pl.ds(j * tk, tk), :]
            # Base-2 exponent: exp2 is what the hardware computes.
            s = _capped_scores(q, k, scale, logit_soft_cap, precision)
            kv_pos = kv_offset + kv_start + jnp.arange(tk, dtype=jnp.int32)
            mask = _mask(q_pos, kv_pos, q_real, kv_real, q_ids, kv_ids, causal=causal, window=window)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - m_safe[:, None])
            alpha = jnp.exp2(m - m_safe)
            v = v_ref[pl.ds(j * tk, tk), :]
            pv = _dot(p.astype(v.dtype), v, contract=(1, 0), precision=precision)
            return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=1)

        return _run_if(None if q_ids is None else _ids_overlap(q_ids, kv_ids), compute, carry)

    lo, hi = kv_tile_range(q_first, q_first + count - 1, kv_offset, kv_tiling, causal=causal, window=window)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    m = jnp.full((tq,), -jnp.inf, jnp.float32)
    l = jnp.zeros((tq,), jnp.float32)
    acc, m, l = lax.fori_loop(lo, hi, kv_step, (acc, m, l))
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse_ref[...] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, offsets_ref, dq_ref,
    *, q_tiling, kv_tiling, causal, window, scale, logit_soft_cap, precision,
):
    tq, tk = q_tiling.tile, kv_tiling.tile
    q_offset, kv_offset = offsets_ref[0], offsets_ref[1]
    first, count, q_real = q_tiling.rows(pl.program_id(0))
    q_first = q_offset + first
    q_pos = q_first + jnp.arange(tq, dtype=jnp.int32)
    q, do = q_ref[...], do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]

    def kv_step(j, dq):
        kv_start, _, kv_real = kv_tiling.rows(j)
        kv_ids = None if kv_ids_ref is None else kv_ids_ref[pl.ds(j * tk, tk)]

        def compute(dq):
            k = k_ref[pl.ds(j * tk, tk), :]
            v = v_ref[pl.ds(j * tk, tk), :]
            s = _capped_scores(q, k, scale, logit_soft_cap, precision)
            p = jnp.exp2(s - lse2[:, None])
            kv_pos = kv_offset + kv_start + jnp.arange(tk, dtype=jnp.int32)
            mask = _mask(q_pos, kv_pos, q_real, kv_real, q_ids, kv_ids, causal=causal, window=window)
            if mask is not None:
                # After the exp: a row that saw nothing has lse = -inf, and inf is selected away.
                p = jnp.where(mask, p, 0.0)
            dp = _dot(do, v, contract=(1, 1), precision=precision)
            ds = through_soft_cap(p * (dp - delta[:, None]), s, logit_soft_cap=logit_soft_cap, base2=True)
            return dq + _dot(ds.astype(k.dtype), k, contract=(1, 0), precision=precision)

        return _run_if(None if q_ids is None else _ids_overlap(q_ids, kv_ids), compute, dq)

    lo, hi = kv_tile_range(q_first, q_first + count - 1, kv_offset, kv_tiling, causal=causal, window=window)
    dq = lax.fori_loop(lo, hi, kv_step, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq * scale


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, offsets_ref, dk_ref, dv_ref,
    *, q_tiling, kv_tiling, groups, causal, window, scale, logit_soft_cap, precision,
):
    tq, tk = q_tiling.tile, kv_tiling.tile
    q_offset, kv_offset = offsets_ref[0], offsets_ref[1]
    first, count, kv_real = kv_tiling.rows(pl.program_id(0))
    kv_first = kv_offset + first
    kv_pos = kv_first + jnp.arange(tk, dtype=jnp.int32)
    k, v = k_ref[...], v_ref[...]
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]
    lo, hi = q_tile_range(kv_first, kv_first + count - 1, q_offset, q_tiling, causal=causal, window=window)

    def head(g, carry):
        def q_step(i, carry):
            q_start, _, q_real = q_tiling.rows(i)
            q_ids = None if q_ids_ref is None else q_ids_ref[pl.ds(i * tq, tq)]

            def compute(carry):
                dk, dv = carry
                q = q_ref[pl.ds(i * tq, tq), g, :]
                do = do_ref[pl.ds(i * tq, tq), g, :]
                lse2 = lse_ref[g, pl.ds(i * tq, tq)] * LOG2E
                delta = delta_ref[g, pl.ds(i * tq, tq)]
                s = _capped_scores(q, k, scale, logit_soft_cap, precision)
                p = jnp.exp2(s - lse2[:, None])
                q_pos = q_offset + q_start + jnp.arange(tq, dtype=jnp.int32)
                mask = _mask(q_pos, kv_pos, q_real, kv_real, q_ids, kv_ids, causal=causal, window=window)
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                dv = dv + _dot(p.astype(do.dtype), do, contract=(0, 0), precision=precision)
                dp = _dot(do, v, contract=(1, 1), precision=precision)
                ds = through_soft_cap(p * (dp - delta[:, None]), s, logit_soft_cap=logit_soft_cap, base2=True)
                dk = dk + _dot(ds.astype(q.dtype), q, contract=(0, 0), precision=precision)
                return dk, dv

            return _run_if(None if kv_ids is None else _ids_overlap(q_ids, kv_ids), compute, carry)

        return lax.fori_loop(lo, hi, q_step, carry)

    zeros = tuple(jnp.zeros(ref.shape, jnp.float32) for ref in (dk_ref, dv_ref))
    dk, dv = lax.fori_loop(0, groups, head, zeros)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv
