"""The ring: forward and backward passes of ring attention inside `shard_map`, as one `custom_vjp`.

Each device keeps its query shard. Key/value shards (with their segment ids) travel to the next
device every step; the send of the shard in hand is issued before the compute on it, so XLA can
overlap the two. Partial `(out, lse)` merge exactly in float32. In the backward, dk/dv accumulate
in float32 while travelling with k/v and are back with their owner after the last step.

Causal work is planned per step, never computed and then masked:
- contiguous: step 0 is the diagonal; a later step's shard is wholly in the past (computed with
  no mask) or wholly in the future (skipped).
- zigzag: device i holds chunks i and 2R-1-i; after step 0, a shard from a lower rank is seen
  whole by all queries through its first half only, and a shard from a higher rank is seen whole
  by the second query half only: each later step is exactly half a shard's work, unmasked.
"""

import dataclasses
import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels


@dataclasses.dataclass(frozen=True)
class RingSpec:
    """The static part of a call, hashable so it can be a `custom_vjp` non-differentiable arg."""

    axis_name: Hashable | None
    causal: bool
    scale: float
    layout: str
    impl: str
    block_q: int
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int

    @property
    def zigzag_causal(self):
        return self.causal and self.layout == "zigzag"


def merge(out1, lse1, out2, lse2):
    """Exact merge of two partial attentions (out [B, T, N, H], lse [B, N, T], float32)."""
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)  # both sides empty: weights 0, not NaN
    w1 = jnp.swapaxes(jnp.exp(lse1 - safe), 1, 2)[..., None]  # [B, T, N, 1]
    w2 = jnp.swapaxes(jnp.exp(lse2 - safe), 1, 2)[..., None]
    return w1 * out1 + w2 * out2, lse


def _ring_position(axis_name):
    if axis_name is None:
        return 1, 0
    return lax.axis_size(axis_name), lax.axis_index(axis_name)


def _send_to_next(x, axis_name, ring_size):
    perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]
    return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), x)


def _halves(x, axis):
    c = x.shape[axis] // 2
    return lax.slice_in_dim(x, 0, c, axis=axis), lax.slice_in_dim(x, c, None, axis=axis)


def _first_half(tree, axis=1):
    return jax.tree.map(lambda a: _halves(a, axis)[0], tree)


def _second_half(tree, axis=1):
    return jax.tree.map(lambda a: _halves(a, axis)[1], tree)


def _run_ring(first_step, step, carry_kv, spec):
    """Runs `first_step(kv)` on the local shard, then `step(carry, kv, src)` for steps 1..R-1.

    `src` is the rank whose k/v shard is in hand. The shard for step s+1 is sent before step s
    computes; the last step sends nothing.
    """
    ring_size, rank = _ring_position(spec.axis_name)
    kv = carry_kv
    if ring_size == 1:
        return first_step(kv)
    kv_next = _send_to_next(kv, spec.axis_name, ring_size)
    carry = first_step(kv)

    def body(state, s):
        carry, kv = state
        kv_next = _send_to_next(kv, spec.axis_name, ring_size)
        return (step(carry, kv, (rank - s) % ring_size), kv_next), None

    (carry, kv), _ = lax.scan(body, (carry, kv_next), jnp.arange(1, ring_size - 1))
    return step(carry, kv, (rank - (ring_size - 1)) % ring_size)


def _forward(q, k, v, q_seg, kv_seg, spec):
    _, rank = _ring_position(spec.axis_name)
    shard_fwd = functools.partial(
        pallas_kernels.attention_fwd, impl=spec.impl, scale=spec.scale,
        block_q=spec.block_q, block_kv=spec.block_kv,
    )

    def attend(q, q_seg, kv, **masking):
        k, v, kv_seg = kv
        return shard_fwd(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, **masking)

    def first_step(kv):
        if not spec.zigzag_causal:
            return attend(q, q_seg, kv, causal=spec.causal)
        # Local chunks a (rank i) and b (rank 2R-1-i): a sees a causally; b sees a whole and b
        # causally, which is the causal mask of b against [a; b] placed at relative offset c.
        (q_a, q_b), (seg_a, seg_b) = _halves(q, 1), _split(q_seg)
        out_a, lse_a = attend(q_a, seg_a, _first_half(kv), causal=True)
        out_b, lse_b = attend(q_b, seg_b, kv, causal=True, q_offset=q.shape[1] // 2)
        return jnp.concatenate([out_a, out_b], 1), jnp.concatenate([lse_a, lse_b], 2)

    def step(state, kv, src):
        if not spec.causal:
            return merge(*state, *attend(q, q_seg, kv, causal=False))
        if spec.layout == "contiguous":
            return lax.cond(src < rank, lambda s: merge(*s, *attend(q, q_seg, kv, causal=False)), lambda s: s, state)

        def from_lower_rank(state):  # all queries x first kv half
            return merge(*state, *attend(q, q_seg, _first_half(kv), causal=False))

        def from_higher_rank(state):  # second query half x all kv
            out, lse = state
            (out_a, out_b), (lse_a, lse_b) = _halves(out, 1), _halves(lse, 2)
            out_b, lse_b = merge(out_b, lse_b, *attend(_halves(q, 1)[1], _split(q_seg)[1], kv, causal=False))
            return jnp.concatenate([out_a, out_b], 1), jnp.concatenate([lse_a, lse_b], 2)

        return lax.cond(src < rank, from_lower_rank, from_higher_rank, state)

    return _run_ring(first_step, step, (k, v, kv_seg), spec)


def _split(seg):
    return (None, None) if seg is None else _halves(seg, 1)


def _backward_contributions(q, q_seg, stats, spec):
    """The per-step backward: (dq, dk, dv) float32 contributions of the shard in hand."""
    _, rank = _ring_position(spec.axis_name)
    shard_bwd = functools.partial(
        pallas_kernels.attention_bwd, impl=spec.impl, scale=spec.scale,
        block_q=spec.block_q_dkv, block_kv=spec.block_kv_dkv,
    )

    def grads(q, q_seg, stats, kv, **masking):
        (k, v, kv_seg), (d_out, lse, delta) = kv, stats
        return shard_bwd(
            q, k, v, None, lse, d_out, delta=delta, q_segment_ids=q_seg, kv_segment_ids=kv_seg, **masking
        )

    def split_stats(stats):
        d_out, lse, delta = stats
        (do_a, do_b), (lse_a, lse_b), (delta_a, delta_b) = _halves(d_out, 1), _halves(lse, 2), _halves(delta, 2)
        return (do_a, lse_a, delta_a), (do_b, lse_b, delta_b)

    def first_step(kv):
        if not spec.zigzag_causal:
            return grads(q, q_seg, stats, kv, causal=spec.causal)
        (q_a, q_b), (seg_a, seg_b), (st_a, st_b) = _halves(q, 1), _split(q_seg), split_stats(stats)
        dq_a, dk_a, dv_a = grads(q_a, seg_a, st_a, _first_half(kv), causal=True)
        dq_b, dk, dv = grads(q_b, seg_b, st_b, kv, causal=True, q_offset=q.shape[1] // 2)
        c = dk_a.shape[1]
        return jnp.concatenate([dq_a, dq_b], 1), dk.at[:, :c].add(dk_a), dv.at[:, :c].add(dv_a)

    def step(kv, src):
        if not spec.causal:
            return grads(q, q_seg, stats, kv, causal=False)

        def nothing(kv):
            k, v, _ = kv
            return (
                pallas_kernels.match_vma(jnp.zeros_like(q, jnp.float32), k, *stats),
                pallas_kernels.match_vma(jnp.zeros_like(k, jnp.float32), q, *stats),
                pallas_kernels.match_vma(jnp.zeros_like(v, jnp.float32), q, *stats),
            )

        if spec.layout == "contiguous":
            return lax.cond(src < rank, lambda kv: grads(q, q_seg, stats, kv, causal=False), nothing, kv)

        def from_lower_rank(kv):  # all queries x first kv half
            dq, dk_a, dv_a = grads(q, q_seg, stats, _first_half(kv), causal=False)
            return dq, jnp.concatenate([dk_a, jnp.zeros_like(dk_a)], 1), jnp.concatenate([dv_a, jnp.zeros_like(dv_a)], 1)

        def from_higher_rank(kv):  # second query half x all kv
            dq_b, dk, dv = grads(_halves(q, 1)[1], _split(q_seg)[1], split_stats(stats)[1], kv, causal=False)
            return jnp.concatenate([jnp.zeros_like(dq_b), dq_b], 1), dk, dv

        return lax.cond(src < rank, from_lower_rank, from_higher_rank, kv)

    return first_step, step


def _backward(spec, residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    ring_size, _ = _ring_position(spec.axis_name)
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    first_contrib, contrib = _backward_contributions(q, q_seg, (d_out, lse, delta), spec)

    def first_step(kv):
        dq, dk, dv = first_contrib(kv)
        return dq, (dk, dv)

    def step(carry, kv, src):
        dq, dkv = carry
        # The accumulator of the shard now in hand arrives while this step computes.
        dkv = _send_to_next(dkv, spec.axis_name, ring_size)
        dq_s, dk_s, dv_s = contrib(kv, src)
        return dq + dq_s, (dkv[0] + dk_s, dkv[1] + dv_s)

    dq, dkv = _run_ring(first_step, step, (k, v, kv_seg), spec)
    if ring_size > 1:
        dkv = _send_to_next(dkv, spec.axis_name, ring_size)  # home to the owner
    dk, dv = dkv
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def ring_attention_shard(q, k, v, q_seg, kv_seg, spec):
    """Ring attention on validated local shards; see `ring_attn.ring_attention`."""
    return _ring_attention_fwd(q, k, v, q_seg, kv_seg, spec)[0]


def _ring_attention_fwd(q, k, v, q_seg, kv_seg, spec):
    out, lse = _forward(q, k, v, q_seg, kv_seg, spec)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


ring_attention_shard.defvjp(_ring_attention_fwd, _backward)
