"""Validation shared by the public entry points: trace-time checks whose errors name the argument,
what was expected and what was given."""

import math
from collections.abc import Hashable

import jax.numpy as jnp
from jax import lax

from pallas_kernels import BlockSizes, match_vma
from ring_attn.layout import LAYOUTS


def check_qkv(q, k, v):
    """q [B, T, N, H], k [B, S, K, H] and v [B, S, K, Hv] of one floating dtype, K dividing N.

    The value head dim Hv may differ from q and k's H (multi-head latent attention: 192 / 128)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            expected = {"q": "[B, T, N, H]", "k": "[B, S, K, H]", "v": "[B, S, K, Hv]"}[name]
            raise ValueError(f"{name} must have rank 4, {expected}, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k [B, S, K, H] and v [B, S, K, Hv] must agree on B, S and K, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    (B, _, N, H), (Bk, _, K, Hk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"q and k must have the same batch size, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if H != Hk:
        raise ValueError(
            f"q and k must have the same head dim (scores are q·k), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if N % K:
        raise ValueError(f"k has {K=} heads, which must divide q's {N=}: q {tuple(q.shape)}, k {tuple(k.shape)}")


def checked_scale(scale, H):
    """The score scale as a float: 1 / sqrt(H) for None, else a finite Python number."""
    if scale is None:
        return 1.0 / math.sqrt(H)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number or None, got {scale!r}")
    return float(scale)


def checked_soft_cap(logit_soft_cap):
    """The logit soft-cap as a float: None, or a finite positive Python number."""
    if logit_soft_cap is None:
        return None
    if (
        isinstance(logit_soft_cap, bool) or not isinstance(logit_soft_cap, (int, float))
        or not math.isfinite(logit_soft_cap) or logit_soft_cap <= 0
    ):
        raise ValueError(f"logit_soft_cap must be a positive finite Python number or None, got {logit_soft_cap!r}")
    return float(logit_soft_cap)


def checked_sinks(sinks, N, like):
    """None, or the sinks as a floating array [N] made device-varying as `like` is (so that the
    transpose of that sums each device's share of their gradient)."""
    if sinks is None:
        return None
    if not hasattr(sinks, "shape") or not hasattr(sinks, "dtype"):
        raise ValueError(f"sinks must be a floating array [N] = ({N},) or None, got {type(sinks).__name__}")
    if tuple(sinks.shape) != (N,):
        raise ValueError(f"sinks must have shape [N] = ({N},), one logit per query head, got {tuple(sinks.shape)}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(f"sinks must have a floating dtype, got {sinks.dtype}")
    return match_vma(sinks, like)


def check_window(window):
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window must be a positive int or None, got {window!r}")


def check_block_sizes(block_sizes):
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a ring_attn.BlockSizes or None, got {block_sizes!r}")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown {layout=}; expected one of {LAYOUTS}")


def checked_int_array(name, ids, shape, dims):
    """`ids` as int32, checked to be an integer array of `shape` (named `dims` in the message)."""
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        raise ValueError(f"{name} must be an integer array, got {type(ids).__name__}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {dims} = {shape}, got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
    return ids.astype(jnp.int32)


def split_segment_ids(segment_ids, B, T, S):
    """int32 (q_ids [B, T], kv_ids [B, S]) from ids [B, T] (T == S) or a pair; (None, None)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids as a sequence must be a pair (q_ids, kv_ids), got {len(segment_ids)} items")
        return (
            checked_int_array("q_segment_ids", segment_ids[0], (B, T), "[B, T]"),
            checked_int_array("kv_segment_ids", segment_ids[1], (B, S), "[B, S]"),
        )
    if T != S:
        raise ValueError(
            f"segment_ids [B, T] is for self-attention (T == S), got {T=} and {S=}: "
            "pass a pair (q_segment_ids, kv_segment_ids)"
        )
    ids = checked_int_array("segment_ids", segment_ids, (B, T), "[B, T]")
    return ids, ids


def ring_position(axis_name: Hashable | None, fn="ring_attention"):
    """(ring size, this device's index along `axis_name`); (1, 0) for None. `fn` names the public
    function in the error raised when the axis is not bound."""
    if axis_name is None:
        return 1, 0
    try:
        return lax.axis_size(axis_name), lax.axis_index(axis_name)
    except NameError:
        global_form = " (or use ring_attention_global)" if fn == "ring_attention" else ""
        raise ValueError(
            f"{axis_name=} is not bound: call {fn} inside jax.shard_map over a mesh with that axis"
            f"{global_form}, or pass axis_name=None for one device"
        ) from None
