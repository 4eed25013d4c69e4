"""The ring: forward and backward passes of ring attention inside `shard_map`, as one `custom_vjp`.

Each device keeps its query shard. Key/value shards travel to the next device every step (key
segment ids are all-gathered once instead: 4 bytes a token, and one transfer fewer a step). The
overlap is built into the loop's shape (`_run_ring`): every step, the first and the last
included, is an iteration that issues one transfer (the next shard; in the backward also the
dk/dv accumulators of the shard in hand) which nothing of its own compute reads, then runs its
kernels. `tests/test_schedule_sweep.py` holds the compiled schedules to it. Partial `(out, lse)`
merge exactly in float32. In the backward, dk/dv accumulate in float32 while they travel and are
sent home to their owner after the last step.

Causal work is planned per step, never computed and then masked:
- contiguous: step 0 is the diagonal; a later step's shard is wholly in the past (computed with
  no mask) or wholly in the future (skipped).
- zigzag: device i holds chunks i and 2R-1-i; after step 0, a shard from a lower rank is seen
  whole by all queries through its first half only, and a shard from a higher rank is seen whole
  by the second query half only: each later step is exactly half a shard's work, unmasked.
- a causal sliding window (contiguous): the ring stops after the hops the window reaches.
- packed documents (contiguous, causal, segment ids): the ring stops after the hops the longest
  document reaches, a number known only at run time (`document_steps`: the shards' id ranges,
  gathered, and one max over the ring); the loop is a `while_loop`, and dk/dv go home by at most
  log2(R) power-of-two hops. Zigzag cannot end early this way: a device's second chunk reads keys
  from devices of higher rank and its first chunk from lower ranks, so the needed shards lie both
  ways round the ring, and ending early would need a ring that sends both ways; packed short
  documents want the contiguous layout.
"""

import dataclasses
import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels
from ring_attn.aot import RING_SCOPE
from ring_attn.checks import ring_position
from ring_attn.layout import halves


@dataclasses.dataclass(frozen=True, kw_only=True)
class RingSpec:
    """The static part of a call, hashable so it can be a `custom_vjp` non-differentiable arg.

    `block_sizes` has every field set (`pallas_kernels.fit_block_sizes`).
    """

    axis_name: Hashable | None
    causal: bool
    window: int | None
    scale: float
    logit_soft_cap: float | None
    layout: str
    impl: pallas_kernels.Kernel
    block_sizes: pallas_kernels.BlockSizes

    @property
    def zigzag_causal(self):
        return self.causal and self.layout == "zigzag"


def steps_needed(ring_size, shard_len, *, causal, window):
    """Ring steps that can see anything: all of them, or for a causal window only the shards
    within reach (step s's nearest key is (s - 1) * shard_len + 1 positions back)."""
    if window is None or not causal:
        return ring_size
    return min(ring_size, -(-(window - 1) // shard_len) + 1)


def _id_ranges_meet(q_range, kv_range):
    """Some batch row where a query id range [min, max] meets a key id range: int [..., B, 2] each.
    Disjoint ranges share no id; exact for the sorted ids that packing produces, and never
    wrong for others (it may only keep a shard that turns out to have no common id)."""
    return jnp.any((q_range[..., 0] <= kv_range[..., 1]) & (kv_range[..., 0] <= q_range[..., 1]), axis=-1)


def _id_range(ids):
    return jnp.stack([ids.min(axis=1), ids.max(axis=1)], axis=-1)  # [B, T] -> [B, 2]


def document_steps(q_seg, kv_seg, axis_name):
    """int32 scalar, the same on every device: the ring steps a causal contiguous ring needs with
    these segment ids, 1 + the farthest hop back from any query shard to a key shard that shares
    an id with it. The key shards' id ranges are all-gathered (B * 2 ints each) and each device's
    farthest hop is maxed over every manual mesh axis, not only the ring's: the ring's sends then
    run the same number of times on every device of the program, as SPMD collectives must."""
    ring_size, rank = ring_position(axis_name)
    kv_ranges = lax.all_gather(_id_range(kv_seg), axis_name)  # [R, B, 2]
    src = jnp.arange(ring_size)
    needed = _id_ranges_meet(_id_range(q_seg)[None], kv_ranges) & (src <= rank)
    farthest = jnp.max(jnp.where(needed, rank - src, 0))
    axes = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    varying = jax.typeof(farthest).manual_axis_type.varying
    if varying:  # shard_map's vma check is on: a max over an axis the value does not vary over is refused
        farthest = lax.pcast(farthest, tuple(a for a in axes if a not in varying), to="varying")
    return lax.pmax(farthest, axes).astype(jnp.int32) + 1


def merge(out1, lse1, out2, lse2):
    """Exact merge of two partial attentions (out [B, T, N, H], lse [B, N, T], float32)."""
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)  # both sides empty: weights 0, not NaN
    w1 = jnp.swapaxes(jnp.exp(lse1 - safe), 1, 2)[..., None]  # [B, T, N, 1]
    w2 = jnp.swapaxes(jnp.exp(lse2 - safe), 1, 2)[..., None]
    return w1 * out1 + w2 * out2, lse


def shift(x, axis_name, ring_size, hops=1):
    """Sends every device's `x` (a pytree) to the device `hops` further round the ring."""
    perm = [(i, (i + hops) % ring_size) for i in range(ring_size)]
    return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), x)


def _hop(x, spec, ring_size):
    """One ring step's transfer: `x` (a pytree) to the next device, under `aot.RING_SCOPE`.

    For GPU kernels the leaves go as one buffer of bytes: XLA's GPU scheduler keeps one
    collective in flight at a time, so separate k and v permutes would leave one of them
    exposed before the step's kernel; one permute overlaps the kernel whole. (On TPU, bytes
    would cost a relayout of every leaf; there the permutes go as they are.)"""
    with jax.named_scope(RING_SCOPE):
        if not spec.impl.gpu or len(jax.tree.leaves(x)) < 2:
            return shift(x, spec.axis_name, ring_size)
        leaves, tree = jax.tree.flatten(x)
        sent = shift(_as_bytes(leaves), spec.axis_name, ring_size)
        return jax.tree.unflatten(tree, _from_bytes(sent, leaves))


def _as_bytes(leaves):
    """The leaves' bytes, concatenated into one uint8 vector."""
    def raw(a):
        a = lax.bitcast_convert_type(a, jnp.uint8) if a.dtype.itemsize > 1 else a.view(jnp.uint8)
        return a.reshape(-1)

    return jnp.concatenate([raw(a) for a in leaves])


def _from_bytes(buffer, like):
    """`_as_bytes`'s inverse: arrays shaped and typed as `like`."""
    out, start = [], 0
    for a in like:
        size = a.size * a.dtype.itemsize
        raw = lax.slice(buffer, (start,), (start + size,))
        start += size
        if a.dtype.itemsize > 1:
            out.append(lax.bitcast_convert_type(raw.reshape(*a.shape, a.dtype.itemsize), a.dtype))
        else:
            out.append(raw.reshape(a.shape).view(a.dtype))
    return out


def _part(x, part, axis=1):
    """`x`, or its first or second half along `axis` (the zigzag chunks)."""
    if x is None or part == "all":
        return x
    return halves(x, axis)[0 if part == "first" else 1]


def _place(part, full, value, axis):
    """`value`, computed for a half, written into `full`'s shape (the other half from `full`)."""
    if part == "all":
        return value
    a, b = halves(full, axis)
    return jnp.concatenate([value, b] if part == "first" else [a, value], axis)


def _pad(part, value, axis=1):
    """`value`, computed for a half, as a full-size contribution with zeros in the other half."""
    if part == "all":
        return value
    zeros = jnp.zeros_like(value)
    return jnp.concatenate([value, zeros] if part == "first" else [zeros, value], axis)


@dataclasses.dataclass(frozen=True)
class _Choice:
    """A ring step's work as alternatives picked on the device at run time: `branches[index]()`.

    Kept as alternatives, not run, so that the ring's loop can make the first step one more
    alternative of a single `lax.switch` (no conditional nested in another)."""

    index: jax.Array | int
    branches: tuple

    def map(self, fn):
        """The same choice, each branch's result passed through `fn`."""
        return _Choice(self.index, tuple(lambda b=b: fn(b()) for b in self.branches))

    def run(self, first, is_first):
        """The chosen branch's result, or `first()`'s where `is_first`: one `lax.switch`."""
        index = jnp.where(is_first, 0, 1 + jnp.asarray(self.index, jnp.int32))
        return lax.switch(index, (first, *self.branches))


def _run_ring(first_step, step, kv, spec, num_steps, travelling=None):
    """Runs `first_step(kv)` on the local shard, then `step(carry, kv, src)` (a `_Choice`) for
    steps 1..num_steps-1, where `src` is the rank whose k/v shard is in hand. `num_steps` is an
    int, or a traced int32 that is the same on every device (then a `while_loop`).

    `travelling`, None or a pair `(send, combine)`: what travels with the shards (the backward's
    dk/dv accumulators). Each step sends `send(carry)` along with the shard in hand, and its
    result (of `first_step` or `step`) becomes the carry `combine(carry, result, arrived)`,
    where `arrived` is the previous device's `send(carry)`, the accumulators of the shard now in
    hand.

    Every step is an iteration of one loop, the first and the last included: the iteration
    issues the shard for the next step and what travels, in one transfer that nothing of its
    compute reads, then computes (one `lax.switch` on the step index and the step's own choice
    picks the kernels). A step peeled off the loop lets the scheduler run its kernels before the
    first hop starts, or finish the last hop before the kernels: a transfer with nothing to hide
    behind. The last step's send is wasted; the first iteration starts from a carry of zeros,
    and sends zeros as `send(carry)`, which `combine` must treat as nothing (a sum does).

    Two things make the kernels run while the transfer is in flight, whatever surrounds the
    ring: the step's kernels sit in one conditional (the switch), even when the step has a single
    choice, so the scheduler moves them as a unit; and an optimization barrier joins the step's
    result with what the transfer brought, so that nothing after the step can start until both
    are done, and nothing gives the scheduler a reason to wait for the transfer before the
    kernels. Without the barrier XLA's TPU scheduler left transfers exposed in a third of drawn
    configurations, without the switch in a sixth (bench/RESULTS.md, "Every ring transfer
    hidden"); `tests/test_schedule_sweep.py` keeps it so."""
    if not isinstance(num_steps, int):
        return lax.cond(
            num_steps > 1,
            lambda kv: _run_ring_until(first_step, step, kv, spec, num_steps, travelling), first_step, kv,
        )
    if num_steps == 1:
        return first_step(kv)
    empty = _zeros_like(jax.eval_shape(first_step, kv))
    body = _ring_iteration(first_step, step, spec, travelling)
    (carry, _), _ = lax.scan(lambda state, s: (body(s, state), None), (empty, kv), jnp.arange(num_steps))
    return carry


def _zeros_like(abstract):
    """Zeros of the shapes, dtypes and device-varying axes of `abstract` (a pytree of
    `jax.ShapeDtypeStruct`s), as a loop carry must match what its body returns."""
    def zeros(a):
        x = jnp.zeros(a.shape, a.dtype)
        varying = tuple(sorted(a.manual_axis_type.varying)) if a.manual_axis_type is not None else ()
        return lax.pcast(x, varying, to="varying") if varying else x

    return jax.tree.map(zeros, abstract)


def _ring_iteration(first_step, step, spec, travelling):
    """One loop iteration of `_run_ring`: (carry, shard in hand) -> (carry, next shard)."""
    ring_size, rank = ring_position(spec.axis_name)

    def body(s, state):
        carry, kv = state
        send, combine = travelling or (lambda carry: None, None)
        kv_next, arrived = _hop((kv, send(carry)), spec, ring_size)
        result = step(carry, kv, (rank - s) % ring_size).run(first=lambda: first_step(kv), is_first=s == 0)
        result, kv_next, arrived = lax.optimization_barrier((result, kv_next, arrived))
        return result if combine is None else combine(carry, result, arrived), kv_next

    return body


def _run_ring_until(first_step, step, kv, spec, num_steps, travelling):
    """`_run_ring` for a traced `num_steps` > 1: its loop a `while_loop`."""
    empty = _zeros_like(jax.eval_shape(first_step, kv))
    body = _ring_iteration(first_step, step, spec, travelling)
    _, carry, _ = lax.while_loop(
        lambda state: state[0] < num_steps, lambda state: (state[0] + 1, *body(state[0], state[1:])),
        (jnp.int32(0), empty, kv),
    )
    return carry


def _send_home(x, spec, ring_size, num_steps):
    """`x`, the accumulators of the shard `num_steps - 1` hops behind, sent to its owner: one
    ppermute for a static count; for a traced one, a hop of 2^b for each bit b set in it."""
    if isinstance(num_steps, int):
        return x if num_steps == 1 else shift(x, spec.axis_name, ring_size, hops=1 - num_steps)
    back = num_steps - 1
    for bit in range(max(ring_size - 1, 1).bit_length()):
        hop = functools.partial(shift, axis_name=spec.axis_name, ring_size=ring_size, hops=-(1 << bit))
        x = lax.cond((back >> bit) & 1 == 1, hop, lambda x: x, x)
    return x


class _Plan:
    """Which kernel calls each ring step makes, shared by the forward and the backward.

    `call(q_part, kv_part, **masking)` runs the kernel on (a half of) the local queries and (a
    half of) the shard in hand; parts are "all", "first" or "second".
    """

    def __init__(self, spec, q_seg, kv_seg, T, S):
        self.spec = spec
        self.ring_size, self.rank = ring_position(spec.axis_name)
        self.T, self.S = T, S
        self.num_steps = steps_needed(self.ring_size, T, causal=spec.causal, window=spec.window)
        # Packed documents on a causal contiguous ring: as many steps as the longest one needs,
        # and a step whose shard shares no id with the local queries is skipped whole.
        self.documents = spec.causal and spec.layout == "contiguous" and q_seg is not None and self.num_steps > 1
        if self.documents:
            self.num_steps = jnp.minimum(document_steps(q_seg, kv_seg, spec.axis_name), self.num_steps)
            self.q_range = _id_range(q_seg)
        # Every shard's key ids, gathered once (4 bytes a token): only k and v travel the ring.
        one_step = isinstance(self.num_steps, int) and self.num_steps == 1
        self.kv_seg_all = None if kv_seg is None or one_step else lax.all_gather(kv_seg, spec.axis_name)

    def kv_segment_ids(self, src):
        """The key segment ids of the shard of rank `src` (traced), or None."""
        return None if self.kv_seg_all is None else self.kv_seg_all[src]

    def branch(self, pred, true_fn, false_fn):
        """A `_Choice` on a per-device predicate. Interpreted TPU kernels synchronise all devices
        inside every kernel call, so there each device runs both branches and selects."""
        if not self.spec.impl.interpreted:
            return _Choice(jnp.where(pred, 0, 1), (true_fn, false_fn))
        return _Choice(0, (lambda: jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(), false_fn()),))

    def first_step(self, call):
        spec = self.spec
        if not spec.zigzag_causal:
            return [call("all", "all", causal=spec.causal, window=spec.window)]
        # Local chunks a (rank i) and b (rank 2R-1-i): a sees a causally; b sees a whole and b
        # causally, which is the causal mask of b against [a; b] placed at relative offset T/2.
        return [
            call("first", "first", causal=True),
            call("second", "all", causal=True, q_offset=self.T // 2),
        ]

    def later_step(self, src, kv_seg, call, skip):
        """Traced over `src` (the rank whose shard is in hand, with ids `kv_seg`): a `_Choice` of
        the step's calls (combined by the caller's `call`)."""
        spec = self.spec
        if self.documents:
            visible = (src < self.rank) & _id_ranges_meet(self.q_range, _id_range(kv_seg))
            if spec.window is None:
                return self.branch(visible, lambda: call("all", "all", causal=False), skip)
            offsets = dict(q_offset=self.rank * self.T, kv_offset=src * self.S)
            return self.branch(visible, lambda: call("all", "all", causal=True, window=spec.window, **offsets), skip)
        if not spec.causal and spec.window is None:
            return _Choice(0, (lambda: call("all", "all", causal=False),))
        if spec.window is not None:
            # Global offsets (traced): the kernel skips tiles beyond the window.
            offsets = dict(q_offset=self.rank * self.T, kv_offset=src * self.S)
            attend = lambda: call("all", "all", causal=spec.causal, window=spec.window, **offsets)  # noqa: E731
            return _Choice(0, (attend,)) if not spec.causal else self.branch(src < self.rank, attend, skip)
        if spec.layout == "contiguous":
            return self.branch(src < self.rank, lambda: call("all", "all", causal=False), skip)
        # zigzag: a lower rank's shard is seen by all queries through its first half; a higher
        # rank's shard is seen whole by the second query half.
        return self.branch(
            src < self.rank,
            lambda: call("all", "first", causal=False),
            lambda: call("second", "all", causal=False),
        )


def _forward(spec, q, k, v, q_seg, kv_seg):
    plan = _Plan(spec, q_seg, kv_seg, q.shape[1], k.shape[1])
    shard_fwd = functools.partial(
        pallas_kernels.attention_fwd, impl=spec.impl, scale=spec.scale, logit_soft_cap=spec.logit_soft_cap,
        block_q=spec.block_sizes.block_q, block_kv=spec.block_sizes.block_kv,
    )

    def partial_attention(q_part, kv_part, kv, **masking):
        k_, v_, kv_seg_ = (_part(x, kv_part) for x in kv)
        return shard_fwd(
            _part(q, q_part), k_, v_, q_segment_ids=_part(q_seg, q_part), kv_segment_ids=kv_seg_, **masking
        )

    def first_step(kv):
        parts = plan.first_step(functools.partial(partial_attention, kv=(*kv, kv_seg)))
        outs, lses = zip(*parts)
        return jnp.concatenate(outs, 1), jnp.concatenate(lses, 2)

    def step(state, kv, src):
        kv = (*kv, plan.kv_segment_ids(src))

        def merged(q_part, kv_part, **masking):
            out, lse = partial_attention(q_part, kv_part, kv, **masking)
            full_out, full_lse = state
            new_out, new_lse = merge(_part(full_out, q_part, 1), _part(full_lse, q_part, 2), out, lse)
            return _place(q_part, full_out, new_out, 1), _place(q_part, full_lse, new_lse, 2)

        return plan.later_step(src, kv[2], merged, lambda: state)

    return _run_ring(first_step, step, (k, v), spec, plan.num_steps)


def backward(spec, residuals, d_out):
    """The ring's backward from `_ring_attention_fwd`'s residuals: (dq, dk, dv, None, None, dsinks).

    `lse` and `out` are final, sinks folded in, which is all the kernels need to be exact with
    sinks. This device's rows give their share of the sinks' gradient; `ring_attention_shard`'s
    caller made sinks device-varying, so JAX's transpose of that sums the shares over the ring."""
    q, k, v, q_seg, kv_seg, sinks, out, lse = residuals
    plan = _Plan(spec, q_seg, kv_seg, q.shape[1], k.shape[1])
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    shard_bwd = functools.partial(
        pallas_kernels.attention_bwd, impl=spec.impl, scale=spec.scale, logit_soft_cap=spec.logit_soft_cap,
        block_q=spec.block_sizes.block_q_dkv, block_kv=spec.block_sizes.block_kv_dkv,
    )

    def contributions(q_part, kv_part, kv, **masking):
        """Full-size float32 (dq, dk, dv) from the kernel on the given halves."""
        k_, v_, kv_seg_ = (_part(x, kv_part) for x in kv)
        dq, dk, dv = shard_bwd(
            _part(q, q_part), k_, v_, None, _part(lse, q_part, 2), _part(d_out, q_part),
            delta=_part(delta, q_part, 2), q_segment_ids=_part(q_seg, q_part), kv_segment_ids=kv_seg_, **masking,
        )
        return _pad(q_part, dq), _pad(kv_part, dk), _pad(kv_part, dv)

    def nothing():
        like = (q, k, v, d_out, lse)
        return tuple(pallas_kernels.match_vma(jnp.zeros_like(x, jnp.float32), *like) for x in (q, k, v))

    def first_step(kv):
        parts = plan.first_step(functools.partial(contributions, kv=(*kv, kv_seg)))
        dq, dk, dv = (functools.reduce(jnp.add, xs) for xs in zip(*parts))
        return dq, (dk, dv)

    def step(carry, kv, src):
        kv = (*kv, plan.kv_segment_ids(src))
        choice = plan.later_step(src, kv[2], functools.partial(contributions, kv=kv), nothing)
        return choice.map(lambda d: (d[0], (d[1], d[2])))

    def combine(carry, result, arrived):
        # This step's share of dq, and of dk/dv of the shard in hand, whose accumulators arrived
        # while it computed. Added outside the step's branches, as nothing inside depends on them.
        (dq, _), (dq_s, (dk_s, dv_s)) = carry, result
        return dq + dq_s, (arrived[0] + dk_s, arrived[1] + dv_s)

    dq, dkv = _run_ring(
        first_step, step, (k, v), spec, plan.num_steps, travelling=(lambda carry: carry[1], combine)
    )
    dk, dv = _send_home(dkv, spec, plan.ring_size, plan.num_steps)
    d_sinks = None if sinks is None else pallas_kernels.sinks_grad(lse, delta, sinks).astype(sinks.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def ring_attention_shard(q, k, v, q_seg, kv_seg, sinks, specs):
    """Ring attention on validated local shards; see `ring_attn.ring_attention`. `specs` is a
    `pallas_kernels.PerPlatform` of `RingSpec`s, one per kernel (the platform being compiled for
    picks). `sinks` (or None) must vary over every mesh axis q varies over
    (`pallas_kernels.match_vma`)."""
    return _ring_attention_fwd(q, k, v, q_seg, kv_seg, sinks, specs)[0]


def _ring_attention_fwd(q, k, v, q_seg, kv_seg, sinks, specs):
    out, lse = specs.dispatch(_forward, q, k, v, q_seg, kv_seg)
    if sinks is not None:
        out, lse = pallas_kernels.fold_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, sinks, out, lse)


def _ring_attention_bwd(specs, residuals, d_out):
    return specs.dispatch(backward, residuals, d_out)


ring_attention_shard.defvjp(_ring_attention_fwd, _ring_attention_bwd)
