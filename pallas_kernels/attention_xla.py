"""Blockwise (flash) attention in portable jnp: the kernel contract, fast on CPU, runs anywhere.

The forward returns the normalised partial output and its log-sum-exp, both float32, so that a
ring can merge partial results exactly; the backward recomputes the probabilities from that `lse`.
Global positions enter as `q_offset` / `kv_offset` (traced scalars are fine), so one function
serves every ring step. Tiles wholly hidden by causality or segments are skipped by `lax.cond`.
Grouped-query attention groups the N query heads as `[K, G = N // K]`; K/V are never repeated.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def match_vma(x, *refs):
    """`x` made varying over every manual mesh axis any of `refs` varies over (shard_map typing)."""
    have = jax.typeof(x).manual_axis_type.varying
    want = frozenset().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))
    missing = tuple(sorted(want - have))
    return lax.pcast(x, missing, to="varying") if missing else x


def _q_blocks(x, block_q, K):
    """[B, T, N, ...] -> [nq, B, K, G, block_q, ...]."""
    B, T, N = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, T // block_q, block_q, K, N // K, *rest)
    return jnp.moveaxis(x, (1, 2), (0, 4))


def _q_unblock(x):
    """[nq, B, K, G, block_q, ...] -> [B, T, N, ...]."""
    nq, B, K, G, bq = x.shape[:5]
    rest = x.shape[5:]
    return jnp.moveaxis(x, (0, 4), (1, 2)).reshape(B, nq * bq, K * G, *rest)


def _row_blocks(x, block_q, K):
    """Per-row statistic [B, N, T] -> [nq, B, K, G, block_q]."""
    B, N, T = x.shape
    return jnp.moveaxis(x.reshape(B, K, N // K, T // block_q, block_q), 3, 0)


def _row_unblock(x):
    """[nq, B, K, G, block_q] -> [B, N, T]."""
    nq, B, K, G, bq = x.shape
    return jnp.moveaxis(x, 0, 3).reshape(B, K * G, nq * bq)


def _kv_blocks(x, block_kv):
    """[B, S, K, H] -> [nk, B, K, block_kv, H]."""
    B, S, K, H = x.shape
    return x.reshape(B, S // block_kv, block_kv, K, H).transpose(1, 0, 3, 2, 4)


def _kv_unblock(x):
    """[nk, B, K, block_kv, H] -> [B, S, K, H]."""
    nk, B, K, bk, H = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, H)


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
    intact under vmap.
    """

    def __init__(
        self, *, causal, window, q_segment_ids, kv_segment_ids, q_offset, kv_offset, T, S, block_q, block_kv, typed_like
    ):
        self.causal, self.window = causal, window
        self.segments = q_segment_ids is not None
        self.q_tiles, self.kv_tiles = {}, {}
        if causal or window is not None:
            # Global positions per tile: [nq, bq] and [nk, bk].
            q_pos = q_offset + jnp.arange(T, dtype=jnp.int32).reshape(-1, block_q)
            kv_pos = kv_offset + jnp.arange(S, dtype=jnp.int32).reshape(-1, block_kv)
            self.q_tiles["pos"], self.kv_tiles["pos"] = match_vma(q_pos, *typed_like), match_vma(kv_pos, *typed_like)
        if self.segments:
            B = q_segment_ids.shape[0]
            self.q_tiles["seg"] = q_segment_ids.reshape(B, -1, block_q).transpose(1, 0, 2)  # [nq, B, bq]
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

    def element_mask(self, q_tile, kv_tile):
        """[B or 1, 1, 1, block_q, block_kv] bool, broadcasting over [B, K, G, bq, bk]."""
        masks = []
        if self.causal or self.window is not None:
            distance = q_tile["pos"][:, None] - kv_tile["pos"][None, :]  # [bq, bk]
        if self.causal:
            masks.append((distance >= 0)[None])
        if self.window is not None:
            masks.append((distance < self.window if self.causal else jnp.abs(distance) < self.window)[None])
        if self.segments:
            masks.append(q_tile["seg"][:, :, None] == kv_tile["seg"][:, None, :])
        return functools.reduce(jnp.logical_and, masks)[:, None, None]

    def run_if_visible(self, q_tile, kv_tile, compute, skip, *operands):
        if not self.any:
            return compute(*operands)
        return lax.cond(self.tile_visible(q_tile, kv_tile), compute, skip, *operands)


def attention_fwd(
    q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0,
    causal=False, window=None, scale, block_q, block_kv,
):
    """q: [B, T, N, H], k/v: [B, S, K, H] -> (out [B, T, N, H] f32, lse [B, N, T] f32).

    A query at global position i sees the key at j when causal allows (i >= j), the segment ids
    match, and within a `window`: 0 <= i - j < window (causal) or |i - j| < window.
    Rows that see no key give out 0 and lse -inf.
    """
    K = k.shape[2]
    masking = _Masking(
        causal=causal, window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_offset=q_offset, kv_offset=kv_offset, T=q.shape[1], S=k.shape[1], block_q=block_q, block_kv=block_kv,
        typed_like=(q, k),
    )
    q_tiles = _q_blocks(q, block_q, K)  # [nq, B, K, G, bq, H]
    k_tiles, v_tiles = _kv_blocks(k, block_kv), _kv_blocks(v, block_kv)  # [nk, B, K, bk, H]

    def q_tile(args):
        q_i, q_info = args  # [B, K, G, bq, H] and the tile's positions/ids

        def kv_step(carry, xs):
            k_j, v_j, kv_info = xs

            def compute(m, l, acc):
                s = jnp.einsum("BKGqH,BKkH->BKGqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
                if masking.any:
                    s = jnp.where(masking.element_mask(q_info, kv_info), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))  # [B, K, G, bq]
                # A row with nothing visible yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])  # [B, K, G, bq, bk]
                alpha = jnp.exp(m - m_safe)
                l = alpha * l + p.sum(-1)
                pv = jnp.einsum("BKGqk,BKkH->BKGqH", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv

            return masking.run_if_visible(q_info, kv_info, compute, lambda *c: c, *carry), None

        acc = match_vma(jnp.zeros_like(q_i, jnp.float32), k, v)
        l = acc[..., 0]
        m = l - jnp.inf
        (m, l, acc), _ = lax.scan(kv_step, (m, l, acc), (k_tiles, v_tiles, masking.kv_tiles))
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        return out, lse

    out, lse = lax.map(q_tile, (q_tiles, masking.q_tiles))
    return _q_unblock(out), _row_unblock(lse)


def attention_bwd(
    q, k, v, out, lse, d_out, *, delta=None, q_segment_ids=None, kv_segment_ids=None,
    q_offset=0, kv_offset=0, causal=False, window=None, scale, block_q, block_kv,
):
    """Gradients of `attention_fwd`'s out: float32 `(dq [B, T, N, H], dk, dv [B, S, K, H])`.

    `lse` [B, N, T] is the log-sum-exp over every key the rows saw (in a ring: all steps), and
    `delta` [B, N, T] = rowsum(d_out * out) of the final output; computed here when None.
    """
    K = k.shape[2]
    if delta is None:
        delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    masking = _Masking(
        causal=causal, window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_offset=q_offset, kv_offset=kv_offset, T=q.shape[1], S=k.shape[1], block_q=block_q, block_kv=block_kv,
        typed_like=(q, k),
    )
    q_tiles, do_tiles = _q_blocks(q, block_q, K), _q_blocks(d_out, block_q, K)  # [nq, B, K, G, bq, H]
    lse_tiles, delta_tiles = _row_blocks(lse, block_q, K), _row_blocks(delta, block_q, K)  # [nq, B, K, G, bq]
    k_tiles, v_tiles = _kv_blocks(k, block_kv), _kv_blocks(v, block_kv)  # [nk, B, K, bk, H]

    def kv_tile(dq, xs):
        k_j, v_j, kv_info = xs

        def q_step(carry, xs):
            q_i, do_i, lse_i, delta_i, q_info = xs

            def compute(dk, dv):
                s = jnp.einsum("BKGqH,BKkH->BKGqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
                p = jnp.exp(s - lse_i[..., None])  # [B, K, G, bq, bk]
                if masking.any:
                    p = jnp.where(masking.element_mask(q_info, kv_info), p, 0.0)
                dv = dv + jnp.einsum("BKGqk,BKGqH->BKkH", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
                dp = jnp.einsum("BKGqH,BKkH->BKGqk", do_i, v_j, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])
                dq_i = jnp.einsum("BKGqk,BKkH->BKGqH", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("BKGqk,BKGqH->BKkH", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
                return (dk, dv), dq_i * scale

            def skip(dk, dv):
                return (dk, dv), match_vma(jnp.zeros_like(q_i, jnp.float32), k, v, d_out, lse)

            (dk, dv), dq_i = masking.run_if_visible(q_info, kv_info, compute, skip, *carry)
            return (dk, dv), dq_i

        zeros = match_vma(jnp.zeros_like(k_j, jnp.float32), q, v, d_out, lse)
        (dk_j, dv_j), dq_parts = lax.scan(q_step, (zeros, zeros), (q_tiles, do_tiles, lse_tiles, delta_tiles, masking.q_tiles))
        return dq + dq_parts, (dk_j * scale, dv_j)

    dq = match_vma(jnp.zeros_like(q_tiles, jnp.float32), k, v, d_out, lse)
    dq, (dk, dv) = lax.scan(kv_tile, dq, (k_tiles, v_tiles, masking.kv_tiles))
    return _q_unblock(dq), _kv_unblock(dk), _kv_unblock(dv)
