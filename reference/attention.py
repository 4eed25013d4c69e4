"""Naive attention: the whole score matrix, one softmax, nothing clever.

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so a row with no visible key stays finite; such rows are set to 0 explicitly.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def visible_pairs(T, S, *, causal=False, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0, window=None):
    """[B or 1, T, S] bool: which key each query may attend to (the masks of `attention_with_lse`)."""
    q_pos = q_offset + jnp.arange(T)[:, None]
    kv_pos = kv_offset + jnp.arange(S)[None, :]
    visible = jnp.ones((1, T, S), dtype=bool)
    if causal:
        visible &= (q_pos >= kv_pos)[None]
    if window is not None:
        distance = q_pos - kv_pos
        visible &= (distance < window)[None] if causal else (jnp.abs(distance) < window)[None]
    if q_segment_ids is not None:
        visible &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return visible


def attention_with_lse(
    q,
    k,
    v,
    *,
    causal=False,
    q_segment_ids=None,
    kv_segment_ids=None,
    scale=None,
    q_offset=0,
    kv_offset=0,
    window=None,
    logit_soft_cap=None,
    sinks=None,
    dtype=jnp.float32,
):
    """Returns `(out [B, T, N, H], lse [B, N, T])` computed in `dtype` at the highest precision.

    A query at global position `q_offset + i` sees the key at `kv_offset + j` when
    `i + q_offset >= j + kv_offset` (causal), its segment id equals the key's (segments), and
    their distance is below `window` (sliding window). Rows that see no key give out 0, lse -inf.
    Scores are `scale * q·k`, replaced by `c * tanh(score / c)` when `logit_soft_cap` is c.
    `sinks` [N]: one more logit per head in every row's softmax, with no value; lse includes it
    (a row that sees no key then has lse = its sink, and out 0).
    Pass `dtype=jnp.float64` inside `jax.enable_x64(True)` for a float64 oracle.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / np.sqrt(H)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    # Grouped-query attention: query head n reads key/value head n // (N // K).
    k = jnp.repeat(k, N // K, axis=2)
    v = jnp.repeat(v, N // K, axis=2)
    with jax.default_matmul_precision("highest"):
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) * jnp.asarray(scale, dtype)
        if logit_soft_cap is not None:
            scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
        visible = visible_pairs(
            T, S, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            q_offset=q_offset, kv_offset=kv_offset, window=window,
        )[:, None]  # [B, 1, T, S]
        scores = jnp.where(visible, scores, jnp.asarray(MASK_VALUE, dtype))
        any_visible = jnp.any(visible, axis=-1)  # [B, 1, T]
        lse = jnp.where(any_visible, jax.nn.logsumexp(scores, axis=-1), -jnp.inf)
        if sinks is not None:
            lse = jnp.logaddexp(lse, sinks.astype(dtype)[None, :, None])
        probs = jnp.exp(scores - jnp.where(jnp.isneginf(lse), 0.0, lse)[..., None])
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    out = jnp.where(jnp.swapaxes(any_visible, 1, 2)[..., None], out, 0.0)
    return out, lse


def attention(q, k, v, **kwargs):
    """Naive attention, `[B, T, N, H]` in the reference dtype; see `attention_with_lse`."""
    return attention_with_lse(q, k, v, **kwargs)[0]


def merge_partials(out1, lse1, out2, lse2):
    """Exact softmax merge of attention over two disjoint key sets.

    out: [B, T, N, H], lse: [B, N, T]. A side that saw no key (lse -inf) contributes nothing.
    """
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    w1 = jnp.swapaxes(jnp.exp(lse1 - safe), 1, 2)[..., None]  # [B, T, N, 1]
    w2 = jnp.swapaxes(jnp.exp(lse2 - safe), 1, 2)[..., None]
    return w1 * out1 + w2 * out2, lse
