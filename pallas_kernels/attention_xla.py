"""Blockwise (flash) attention in portable jnp: the kernel contract, fast on CPU, runs anywhere.

The forward returns the normalised partial output and its log-sum-exp, both float32, so that a
ring can merge partial results exactly; the backward recomputes the probabilities from that `lse`.
Global positions enter as `q_offset` / `kv_offset` (traced scalars are fine), so one function
serves every ring step. Tiles wholly hidden by causality or segments are skipped by `lax.cond`.
Grouped-query attention groups the N query heads as `[K, G = N // K]`; K/V are never repeated.

Shaped for a CPU's caches: one kv head at a time (a loop over K outside the tile loops), with its
G query heads as one tile's rows, keeps each score tile small enough to stay in cache between
the matmul that writes it and the elementwise passes that read it.
"""

import functools

import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import match_vma, scores, through_soft_cap


def _q_rows(x, block_q, K):
    """[B, T, N, ...] -> [K, nq, B, G * block_q, ...]: per kv head, a tile's rows are its G query
    heads' queries."""
    B, T, N = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, T // block_q, block_q, K, N // K, *rest)
    x = jnp.moveaxis(x, (3, 1, 0, 4), (0, 1, 2, 3))  # [K, nq, B, G, bq, ...]
    return x.reshape(*x.shape[:3], -1, *rest)


def _q_unrows(x, G):
    """[K, nq, B, G * block_q, ...] -> [B, T, N, ...]."""
    K, nq, B, r = x.shape[:4]
    rest = x.shape[4:]
    x = x.reshape(K, nq, B, G, r // G, *rest)
    return jnp.moveaxis(x, (0, 1, 2, 3), (3, 1, 0, 4)).reshape(B, nq * (r // G), K * G, *rest)


def _stat_rows(x, block_q, K):
    """Per-row statistic [B, N, T] -> [K, nq, B, G * block_q], laid out as `_q_rows` lays out queries."""
    return _q_rows(jnp.swapaxes(x, 1, 2), block_q, K)


def _stat_unrows(x, G):
    """[K, nq, B, G * block_q] -> [B, N, T]."""
    return jnp.swapaxes(_q_unrows(x, G), 1, 2)


def _kv_blocks(x, block_kv):
    """[B, S, K, H] -> [K, nk, B, block_kv, H]."""
    B, S, K, H = x.shape
    return x.reshape(B, S // block_kv, block_kv, K, H).transpose(3, 1, 0, 2, 4)


def _kv_unblock(x):
    """[K, nk, B, block_kv, H] -> [B, S, K, H]."""
    K, nk, B, bk, H = x.shape
    return x.transpose(2, 1, 3, 0, 4).reshape(B, nk * bk, K, H)


def position_conditions(q_first, q_last, kv_first, kv_last, *, causal, window):
    """Scalar bools that must all hold for a query tile [q_first, q_last] to see some key of a
    key tile [kv_first, kv_last] under causality and a sliding window (positions are global)."""
    conditions = []
    if causal:
        conditions.append(q_last >= kv_first)
    if window is not None:
        conditions.append(q_first - kv_last < window)
        if not causal:
            conditions.append(kv_first - q_last < window)
    return conditions


class _Masking:
    """Which (query tile, key tile) pairs are visible, and the element mask inside a tile.

    Per-tile positions and segment ids travel through the loops as scanned inputs (`q_tiles`,
    `kv_tiles`) rather than being indexed by loop counters, which keeps their shard_map typing
    intact under vmap. A query tile's rows are its G heads' queries, so its positions and ids
    repeat G times.
    """

    def __init__(
        self, *, causal, window, q_segment_ids, kv_segment_ids, q_offset, kv_offset, T, S, block_q, block_kv, G,
        typed_like,
    ):
        self.causal, self.window = causal, window
        self.segments = q_segment_ids is not None
        self.q_tiles, self.kv_tiles = {}, {}
        if causal or window is not None:
            q_pos = q_offset + jnp.arange(T, dtype=jnp.int32).reshape(-1, 1, block_q)
            q_pos = jnp.broadcast_to(q_pos, (T // block_q, G, block_q)).reshape(T // block_q, -1)  # [nq, G * bq]
            kv_pos = kv_offset + jnp.arange(S, dtype=jnp.int32).reshape(-1, block_kv)  # [nk, bk]
            self.q_tiles["pos"], self.kv_tiles["pos"] = match_vma(q_pos, *typed_like), match_vma(kv_pos, *typed_like)
        if self.segments:
            B = q_segment_ids.shape[0]
            q_seg = q_segment_ids.reshape(B, -1, 1, block_q).transpose(1, 0, 2, 3)
            self.q_tiles["seg"] = jnp.broadcast_to(q_seg, (T // block_q, B, G, block_q)).reshape(T // block_q, B, -1)
            self.kv_tiles["seg"] = kv_segment_ids.reshape(B, -1, block_kv).transpose(1, 0, 2)  # [nk, B, bk]

    @property
    def any(self):
        return self.causal or self.segments or self.window is not None

    def tile_visible(self, q_tile, kv_tile):
        """Scalar bool: some query of the q tile may see some key of the kv tile."""
        conditions = []
        if "pos" in q_tile:
            q_pos, kv_pos = q_tile["pos"], kv_tile["pos"]
            conditions += position_conditions(
                q_pos[0], q_pos[-1], kv_pos[0], kv_pos[-1], causal=self.causal, window=self.window
            )
        if self.segments:
            # Disjoint id ranges cannot match; exact for the sorted ids that packing produces.
            q_seg, kv_seg = q_tile["seg"], kv_tile["seg"]
            overlap = (q_seg.min(-1) <= kv_seg.max(-1)) & (kv_seg.min(-1) <= q_seg.max(-1))  # [B]
            conditions.append(jnp.any(overlap))
        return functools.reduce(jnp.logical_and, conditions)

    def element_mask(self, q_tile, kv_tile, *, kv_major):
        """Bool, broadcasting over one kv head's scores [B, rows, bk] (or [B, bk, rows] when `kv_major`)."""
        masks = []
        if self.causal or self.window is not None:
            distance = q_tile["pos"][:, None] - kv_tile["pos"][None, :]  # [rows, bk]
        if self.causal:
            masks.append((distance >= 0)[None])
        if self.window is not None:
            masks.append((distance < self.window if self.causal else jnp.abs(distance) < self.window)[None])
        if self.segments:
            masks.append(q_tile["seg"][:, :, None] == kv_tile["seg"][:, None, :])
        mask = functools.reduce(jnp.logical_and, masks)  # [B or 1, rows, bk]
        return jnp.swapaxes(mask, -1, -2) if kv_major else mask

    def run_if_visible(self, q_tile, kv_tile, compute, skip, *operands):
        if not self.any:
            return compute(*operands)
        return lax.cond(self.tile_visible(q_tile, kv_tile), compute, skip, *operands)


def _masking(q, k, q_segment_ids, kv_segment_ids, q_offset, kv_offset, causal, window, block_q, block_kv):
    return _Masking(
        causal=causal, window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_offset=q_offset, kv_offset=kv_offset, T=q.shape[1], S=k.shape[1], block_q=block_q, block_kv=block_kv,
        G=q.shape[2] // k.shape[2], typed_like=(q, k),
    )


def attention_fwd(
    q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0,
    causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv,
):
    """q: [B, T, N, H], k: [B, S, K, H], v: [B, S, K, Hv] -> (out [B, T, N, Hv] f32, lse [B, N, T] f32).

    The value head dim Hv may differ from q and k's H (multi-head latent attention: 192 / 128).

    A query at global position i sees the key at j when causal allows (i >= j), the segment ids
    match, and within a `window`: 0 <= i - j < window (causal) or |i - j| < window.
    Rows that see no key give out 0 and lse -inf. Scores are `scale * q·k`, soft-capped to
    `c * tanh(score / c)` (before masking) when `logit_soft_cap` is c.
    """
    K, G = k.shape[2], q.shape[2] // k.shape[2]
    masking = _masking(q, k, q_segment_ids, kv_segment_ids, q_offset, kv_offset, causal, window, block_q, block_kv)
    # Uncapped, the scale fuses into the exponent; capped, the scores are scaled first.
    exp_scale = scale if logit_soft_cap is None else 1.0
    q_tiles = _q_rows(q, block_q, K)  # [K, nq, B, rows, H]
    # k transposed once here, so each tile's score matmul reads it in the layout it wants.
    kT_tiles = jnp.swapaxes(_kv_blocks(k, block_kv), -1, -2)  # [K, nk, B, H, bk]
    v_tiles = _kv_blocks(v, block_kv)  # [K, nk, B, bk, H]

    def kv_head(args):
        q_h, kT_h, v_h = args

        def q_tile(args):
            q_i, q_info = args  # [B, rows, H]

            def kv_step(carry, xs):
                kT_j, v_j, kv_info = xs

                def compute(m, l, acc):
                    s = jnp.einsum("BrH,BHk->Brk", q_i, kT_j, preferred_element_type=jnp.float32)
                    if logit_soft_cap is not None:
                        s = scores(s, scale=scale, logit_soft_cap=logit_soft_cap)
                    if masking.any:
                        s = jnp.where(masking.element_mask(q_info, kv_info, kv_major=False), s, -jnp.inf)
                    # scale > 0: the max of the scaled scores is the scaled max, and scaling fuses into exp.
                    m_new = jnp.maximum(m, exp_scale * s.max(-1))  # [B, rows]
                    # A row with nothing visible yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
                    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                    p = jnp.exp(exp_scale * s - m_safe[..., None])
                    alpha = jnp.exp(m - m_safe)
                    l = alpha * l + p.sum(-1)
                    pv = jnp.einsum("Brk,BkH->BrH", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                    return m_new, l, alpha[..., None] * acc + pv

                return masking.run_if_visible(q_info, kv_info, compute, lambda *c: c, *carry), None

            acc = match_vma(jnp.zeros((*q_i.shape[:-1], v_h.shape[-1]), jnp.float32), q_i, k, v)  # [B, rows, Hv]
            l = acc[..., 0]
            m = l - jnp.inf
            (m, l, acc), _ = lax.scan(kv_step, (m, l, acc), (kT_h, v_h, masking.kv_tiles))
            seen = l > 0
            out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
            lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
            return out, lse

        return lax.map(q_tile, (q_h, masking.q_tiles))

    out, lse = lax.map(kv_head, (q_tiles, kT_tiles, v_tiles))
    return _q_unrows(out, G), _stat_unrows(lse, G)


def attention_bwd(
    q, k, v, out, lse, d_out, *, delta=None, q_segment_ids=None, kv_segment_ids=None,
    q_offset=0, kv_offset=0, causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv,
):
    """Gradients of `attention_fwd`'s out: float32 `(dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv])`.

    `lse` [B, N, T] is the log-sum-exp over every key the rows saw (in a ring: all steps), and
    `delta` [B, N, T] = rowsum(d_out * out) of the final output; computed here when None.

    Works on transposed scores ([keys, queries]) so that all five matmuls read their operands in
    the layout they want: q, d_out and k are transposed once here, never per tile, and dq is
    accumulated transposed.
    """
    K, G = k.shape[2], q.shape[2] // k.shape[2]
    if delta is None:
        delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    masking = _masking(q, k, q_segment_ids, kv_segment_ids, q_offset, kv_offset, causal, window, block_q, block_kv)
    q_tiles, do_tiles = _q_rows(q, block_q, K), _q_rows(d_out, block_q, K)  # [K, nq, B, rows, H]
    qT_tiles, doT_tiles = jnp.swapaxes(q_tiles, -1, -2), jnp.swapaxes(do_tiles, -1, -2)  # [K, nq, B, H, rows]
    lse_tiles, delta_tiles = _stat_rows(lse, block_q, K), _stat_rows(delta, block_q, K)  # [K, nq, B, rows]
    k_tiles, v_tiles = _kv_blocks(k, block_kv), _kv_blocks(v, block_kv)  # [K, nk, B, bk, H]
    kT_tiles = jnp.swapaxes(k_tiles, -1, -2)

    def kv_head(args):
        q_h, qT_h, do_h, doT_h, lse_h, delta_h, k_h, kT_h, v_h = args

        def kv_tile(dqT, xs):
            k_j, kT_j, v_j, kv_info = xs

            def q_step(carry, xs):
                q_i, qT_i, do_i, doT_i, lse_i, delta_i, q_info = xs

                def compute(dk, dv):
                    sT = jnp.einsum("BkH,BHr->Bkr", k_j, qT_i, preferred_element_type=jnp.float32)
                    sT = scores(sT, scale=scale, logit_soft_cap=logit_soft_cap)
                    pT = jnp.exp(sT - lse_i[:, None, :])  # [B, bk, rows]
                    if masking.any:
                        pT = jnp.where(masking.element_mask(q_info, kv_info, kv_major=True), pT, 0.0)
                    dpT = jnp.einsum("BkH,BHr->Bkr", v_j, doT_i, preferred_element_type=jnp.float32)
                    dsT = through_soft_cap(pT * (dpT - delta_i[:, None, :]), sT, logit_soft_cap=logit_soft_cap)
                    f32 = dict(preferred_element_type=jnp.float32)
                    dv = dv + jnp.einsum("Bkr,BrH->BkH", pT.astype(do_i.dtype), do_i, **f32)
                    dk = dk + jnp.einsum("Bkr,BrH->BkH", dsT.astype(q_i.dtype), q_i, **f32)
                    dqT_i = jnp.einsum("BHk,Bkr->BHr", kT_j, dsT.astype(k_j.dtype), **f32)
                    return (dk, dv), dqT_i

                def skip(dk, dv):
                    return (dk, dv), match_vma(jnp.zeros_like(qT_i, jnp.float32), k, v, d_out, lse)

                return masking.run_if_visible(q_info, kv_info, compute, skip, *carry)

            dk_zeros = match_vma(jnp.zeros_like(k_j, jnp.float32), q, v, d_out, lse)
            dv_zeros = match_vma(jnp.zeros_like(v_j, jnp.float32), q, k, d_out, lse)
            xs = (q_h, qT_h, do_h, doT_h, lse_h, delta_h, masking.q_tiles)
            (dk_j, dv_j), dqT_parts = lax.scan(q_step, (dk_zeros, dv_zeros), xs)
            return dqT + dqT_parts, (dk_j * scale, dv_j)

        dqT = match_vma(jnp.zeros_like(qT_h, jnp.float32), k, v, d_out, lse)
        return lax.scan(kv_tile, dqT, (k_h, kT_h, v_h, masking.kv_tiles))

    per_head = (q_tiles, qT_tiles, do_tiles, doT_tiles, lse_tiles, delta_tiles, k_tiles, kT_tiles, v_tiles)
    dqT, (dk, dv) = lax.map(kv_head, per_head)
    dq = _q_unrows(jnp.swapaxes(dqT, -1, -2), G) * scale
    return dq, _kv_unblock(dk), _kv_unblock(dv)
