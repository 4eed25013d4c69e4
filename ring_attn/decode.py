"""Decoding with a KV cache sharded over the ring axis.

The cache stays where prefill left it: device i holds a shard of C slots in the training layout
("contiguous" or "zigzag", see `ring_attn.layout`), so no reshuffle is needed. The few new query
tokens are replicated; each device attends them to its own shard, and the float32 partials
`(out, lse)` are merged exactly with one collective. Only O(R * B * n * N * Hv) values move, never
the cache. Values may be narrower or wider than queries and keys (Hv != H, as in multi-head latent
attention).
"""

from collections.abc import Hashable

import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.common import scores
from ring_attn.checks import check_layout, checked_scale, checked_sinks, checked_soft_cap, ring_position

# Finite, so a row whose keys are all masked stays finite (it is then set to 0 explicitly).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _check_layout(layout, cache_len):
    check_layout(layout)
    if layout == "zigzag" and cache_len % 2:
        raise ValueError(
            f"layout='zigzag' holds two chunks per device, so the local cache length must be even, got {cache_len}"
        )


def cache_positions(cache_len, axis_name, layout="contiguous"):
    """int32 [cache_len]: the global position of each slot of this device's cache shard.

    contiguous: device i holds [i*C, (i+1)*C). zigzag: with half = C/2, device i holds chunk i
    (slots 0..half-1) and chunk 2R-1-i (slots half..C-1) of the 2R chunks of the global cache.
    """
    _check_layout(layout, cache_len)
    ring_size, index = ring_position(axis_name, "cache_positions")
    if layout == "contiguous":
        return index * cache_len + jnp.arange(cache_len, dtype=jnp.int32)
    half = cache_len // 2
    offsets = jnp.arange(half, dtype=jnp.int32)
    return jnp.concatenate([index * half + offsets, (2 * ring_size - 1 - index) * half + offsets])


def _owner_and_slot(pos, cache_len, ring_size, layout):
    """Inverse of `cache_positions`: the device holding global position `pos` and its local slot."""
    if layout == "contiguous":
        return pos // cache_len, pos % cache_len
    half = cache_len // 2
    chunk, within = pos // half, pos % half
    first = chunk < ring_size  # chunk i sits first on device i; chunk 2R-1-i second
    return jnp.where(first, chunk, 2 * ring_size - 1 - chunk), jnp.where(first, within, half + within)


def _check_array(name, x, rank, dims):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, {dims}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def _check_pair(k_name, k, v_name, v, leading):
    """Keys [*leading, H] and values [*leading, Hv]: each a rank-4 float array, agreeing on the
    `leading` dims (shape letters, e.g. "BCK"); the head dims may differ."""
    k_shape, v_shape = (f"[{', '.join(leading)}, {head}]" for head in ("H", "Hv"))
    _check_array(k_name, k, 4, k_shape)
    _check_array(v_name, v, 4, v_shape)
    if k.shape[:-1] != v.shape[:-1]:
        shared = f"{', '.join(leading[:-1])} and {leading[-1]}"
        raise ValueError(
            f"{k_name} {k_shape} and {v_name} {v_shape} must agree on {shared}, "
            f"got {k_name} {tuple(k.shape)} and {v_name} {tuple(v.shape)}"
        )


def _per_row(name, value, B, low=None, high=None):
    """A Python int or an integer array of shape [] or [B], as int32 [B]. Python ints are also
    range-checked; traced values cannot be."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        return jnp.full((B,), value, jnp.int32)
    if not hasattr(value, "shape") or not hasattr(value, "dtype") or not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f"{name} must be an int or an integer array of shape [B] = ({B},), got {value!r}")
    if tuple(value.shape) not in ((), (B,)):
        raise ValueError(f"{name} must have shape [] or [B] = ({B},), got {tuple(value.shape)}")
    return jnp.broadcast_to(value.astype(jnp.int32), (B,))


def ring_decode(
    q, k_cache, v_cache, *, axis_name: Hashable | None, kv_length, layout="contiguous", scale=None,
    logit_soft_cap=None, sinks=None,
):
    """Attention of n new query tokens over a KV cache sharded round the ring.

    Call inside `jax.shard_map`; the result is the same on every device (out_specs `P()` is fine).

    Args:
      q: [B, n, N, H], the new query tokens, replicated over the ring axis.
      k_cache: [B, C, K, H], v_cache: [B, C, K, Hv], this device's shard of the global cache of
        length R * C (R the ring size), placed as `layout` says; K must divide N (grouped-query
        attention). Hv may differ from H.
      axis_name: the `shard_map` mesh axis the cache is sharded over; None: one device.
      kv_length: int or int array [B]: valid cache positions per batch row, including the n new
        tokens already written (see `ring_cache_update`); at most R * C. Query j sits at global
        position kv_length - n + j and sees the cache positions up to its own (causal).
      layout: "contiguous" or "zigzag", the layout the cache was prefilled in.
      scale: score scale; None: 1 / sqrt(H).
      logit_soft_cap, sinks: as for `ring_attn.ring_attention` (sinks [N], replicated).

    Returns:
      [B, n, N, Hv] in q's dtype, accumulated in float32. A query that sees no key returns 0.
    """
    _check_array("q", q, 4, "[B, n, N, H]")
    _check_pair("k_cache", k_cache, "v_cache", v_cache, "BCK")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share one dtype, got {k_cache.dtype} and {v_cache.dtype}")
    (B, n, N, H), (Bc, C, K, Hc), Hv = q.shape, k_cache.shape, v_cache.shape[-1]
    if (B, H) != (Bc, Hc):
        raise ValueError(f"q [B, n, N, H] = {q.shape} and k_cache [B, C, K, H] = {k_cache.shape} must agree on B and H")
    if N % K:
        raise ValueError(f"k_cache has {K=} heads, which must divide q's {N=}")
    _check_layout(layout, C)
    scale = checked_scale(scale, H)
    logit_soft_cap = checked_soft_cap(logit_soft_cap)
    sinks = checked_sinks(sinks, N, q)
    ring_size, index = ring_position(axis_name, "ring_decode")
    kv_length = _per_row("kv_length", kv_length, B, 0, ring_size * C)

    # Local partial over this shard. Query j of row b sees slot c when pos[c] <= its own position;
    # that also keeps it below kv_length, so slots past the valid prefix (stale or unwritten) drop out.
    q_pos = kv_length[:, None] - n + jnp.arange(n, dtype=jnp.int32)  # [B, n]
    visible = cache_positions(C, axis_name, layout)[None, None, :] <= q_pos[:, :, None]  # [B, n, C]
    visible = visible[:, None, None]  # [B, 1, 1, n, C], against scores [B, K, G, n, C]
    # float32 products for float32 inputs (some backends round to TF32/bf16 by default).
    precision = lax.Precision.HIGHEST if jnp.dtype(q.dtype).itemsize >= 4 else None
    qg = q.reshape(B, n, K, N // K, H)  # query head h reads key/value head h // (N // K)
    s = jnp.einsum("BnKGH,BCKH->BKGnC", qg, k_cache, precision=precision, preferred_element_type=jnp.float32)
    s = jnp.where(visible, scores(s, scale=scale, logit_soft_cap=logit_soft_cap), MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    acc = jnp.einsum("BKGnC,BCKV->BKGnV", p.astype(v_cache.dtype), v_cache, precision=precision,
                     preferred_element_type=jnp.float32)
    seen = jnp.any(visible, axis=-1, keepdims=True)  # [B, 1, 1, n, 1]
    # A row with nothing visible here weighs m - m = 0 for all masked slots: force out 0, lse -inf.
    out = jnp.where(seen, acc / l, 0.0)
    lse = jnp.where(seen, m + jnp.log(l), -jnp.inf)
    partial = jnp.concatenate([out, lse], axis=-1)  # [B, K, G, n, Hv + 1]: one buffer, one collective

    if axis_name is not None:
        # Gather every device's partial with ONE psum of a one-hot slot per device. all_gather would
        # move the same data but its result counts as device-varying under check_vma, so the caller
        # could not return it with out_specs P(); psum's result is replicated by construction.
        slots = jnp.zeros((ring_size,) + partial.shape, jnp.float32)
        partials = lax.psum(lax.dynamic_update_index_in_dim(slots, partial, index, 0), axis_name)
    else:
        partials = partial[None]
    outs, lses = partials[..., :Hv], partials[..., Hv:]
    # Exact logsumexp merge; if no device saw a key, every weight is exp(-inf) = 0 and out is 0.
    if sinks is not None:  # one more partial per head: lse the sink, no value
        sink_lse = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, K, N // K, 1, 1), lses.shape[1:])
        outs = jnp.concatenate([outs, jnp.zeros_like(outs[:1])])
        lses = jnp.concatenate([lses, sink_lse[None]])
    top = jnp.max(lses, axis=0)
    weights = jnp.exp(lses - jnp.where(jnp.isneginf(top), 0.0, top))
    total = jnp.sum(weights, axis=0)
    out = jnp.sum(weights * outs, axis=0) / jnp.where(total > 0, total, 1.0)  # [B, K, G, n, Hv]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, n, N, Hv).astype(q.dtype)


def ring_cache_update(k_cache, v_cache, k_new, v_new, *, axis_name: Hashable | None, position, layout="contiguous"):
    """Writes n new tokens into the sharded cache at global positions position .. position + n - 1.

    Call inside `jax.shard_map`. Each device writes only the positions it holds; no collective.

    Args:
      k_cache: [B, C, K, H], v_cache: [B, C, K, Hv], this device's shard of the global cache (see
        `ring_decode`).
      k_new: [B, n, K, H], v_new: [B, n, K, Hv], the new keys and values, replicated over the ring
        axis.
      axis_name: the mesh axis the cache is sharded over; None: one device.
      position: int or int array [B]: the global position of the first new token, per batch row.
        Tokens that fall outside [0, R * C) are dropped.
      layout: "contiguous" or "zigzag", as the cache was prefilled.

    Returns:
      The updated (k_cache, v_cache), in the caches' dtype.
    """
    _check_pair("k_cache", k_cache, "v_cache", v_cache, "BCK")
    _check_pair("k_new", k_new, "v_new", v_new, "BnK")
    (B, C, K, _), n = k_cache.shape, k_new.shape[1]
    for new_name, new, cache_name, cache, head in (("k_new", k_new, "k_cache", k_cache, "H"),
                                                   ("v_new", v_new, "v_cache", v_cache, "Hv")):
        if (new.shape[0],) + new.shape[2:] != (B, K, cache.shape[-1]):
            raise ValueError(
                f"{new_name} [B, n, K, {head}] = {new.shape} must match {cache_name} [B, C, K, {head}] = "
                f"{cache.shape} on B, K, {head}"
            )
    _check_layout(layout, C)
    ring_size, index = ring_position(axis_name, "ring_cache_update")
    position = _per_row("position", position, B)

    pos = position[:, None] + jnp.arange(n, dtype=jnp.int32)  # [B, n] global positions
    owner, slot = _owner_and_slot(pos, C, ring_size, layout)
    mine = (owner == index) & (pos >= 0) & (pos < ring_size * C)
    # Tokens this device does not hold get slot C, one past the end, which mode="drop" skips
    # (a negative index would wrap round instead).
    slot = jnp.where(mine, slot, C)
    rows = jnp.arange(B)[:, None]
    k_cache = k_cache.at[rows, slot].set(k_new.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, slot].set(v_new.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache
