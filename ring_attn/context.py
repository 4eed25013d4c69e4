"""`context_attention`: one contract, several ways to spread attention over sequence-sharded devices.

Every strategy takes the local shards `ring_attention` takes inside `shard_map` and returns the
same result to float32 rounding; the strategy is a performance choice only.

- "ring": `ring_attention` (k/v shards travel round the ring, overlapped with compute).
- "all_gather": k, v and the kv segment ids are all-gathered over the axis; the local queries
  attend to the whole sequence with their global positions, so the kernels skip causal and window
  tiles as in a ring step. Its gradient (by JAX's transpose of `all_gather`) reduce-scatters dk, dv.
- "ulysses" (DeepSpeed-Ulysses, arXiv 2309.14509): an all-to-all turns sequence shards into head
  shards, each device attends over the whole sequence with N / R heads, and an all-to-all turns the
  result back. K / V heads split the same way, or, when the axis size is a multiple of K, each
  device takes the one kv head its query heads read.
- "usp" (Unified Sequence Parallelism, arXiv 2405.07719): Ulysses over `ulysses_axis` inside a
  ring over `ring_axis`. The sequence lies over both axes, ring axis major, in `layout` order over
  all R_ring * R_ulysses devices; after the all-to-all, each ring position holds a ring-level
  shard of the same layout (for zigzag: its chunks r and 2R_ring - 1 - r of 2R_ring, once its
  local pieces are put in order), and the ring runs over `ring_axis`.
- "auto": `ring_attn.cost.choose_strategy` for the hardware (`hardware=`, default per backend).
"""

import dataclasses
import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels
from pallas_kernels import BlockSizes, Impl
from pallas_kernels.common import offsets_operand
from ring_attn import cost
from ring_attn.attention import ring_attention
from ring_attn.checks import (
    check_block_sizes,
    check_layout,
    check_qkv,
    check_window,
    checked_scale,
    checked_sinks,
    checked_soft_cap,
    ring_position,
    split_segment_ids,
)
from ring_attn.layout import unzigzag, zigzag

STRATEGIES = ("auto", "ring", "all_gather", "ulysses", "usp")


def context_attention(
    q,
    k,
    v,
    *,
    axis_name: Hashable | tuple[Hashable, Hashable],
    strategy: str = "auto",
    causal: bool = False,
    window: int | None = None,
    segment_ids=None,
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    sinks=None,
    layout: str = "zigzag",
    block_sizes: BlockSizes | None = None,
    impl: Impl = "auto",
    hardware: cost.Hardware | str | None = None,
):
    """Exact attention of the local query shard over the whole sharded sequence, by `strategy`.

    Args: as `ring_attention`, and
      axis_name: the mesh axis the sequence is sharded over; for "usp" a pair
        (ring_axis, ulysses_axis) over which it is sharded ring axis major.
      strategy: "ring", "all_gather", "ulysses", "usp" or "auto" (see the module docstring).
      layout: "zigzag" (the default here) or "contiguous", over all the devices of `axis_name`.
      hardware: for "auto", a `ring_attn.cost.Hardware` or a key of `ring_attn.cost.HARDWARE`;
        None: `ring_attn.cost.default_hardware()` for this backend.

    Returns:
      [B, T, N, H] in q's dtype, equal to `ring_attention` on the same shards to float32 rounding.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown {strategy=}; expected one of {STRATEGIES}")
    check_qkv(q, k, v)
    check_layout(layout)
    axes = _axes(axis_name, strategy)
    B, T, N, H = q.shape
    S = k.shape[1]
    if causal and T != S:
        raise ValueError(f"causal attention over sharded devices needs equal local lengths, got {T=} and {S=}")
    if strategy == "auto":
        strategy = _auto(axes, q, k, v, hardware, causal=causal, layout=layout)
    sinks = checked_sinks(sinks, N, q)
    options = dict(causal=causal, window=window, scale=scale, logit_soft_cap=logit_soft_cap, sinks=sinks,
                   block_sizes=block_sizes, impl=impl)
    match strategy:
        case "ring":
            return ring_attention(q, k, v, axis_name=axes[0], segment_ids=segment_ids, layout=layout, **options)
        case "all_gather":
            q_seg, kv_seg = split_segment_ids(segment_ids, B, T, S)
            return _all_gather(q, k, v, q_seg, kv_seg, axis_name=axes[0], layout=layout, **options)
        case "ulysses":
            q_seg, kv_seg = split_segment_ids(segment_ids, B, T, S)
            return _ulysses(q, k, v, q_seg, kv_seg, ring_axis=None, ulysses_axis=axes[0], layout=layout, **options)
        case "usp":
            q_seg, kv_seg = split_segment_ids(segment_ids, B, T, S)
            return _ulysses(q, k, v, q_seg, kv_seg, ring_axis=axes[0], ulysses_axis=axes[1], layout=layout, **options)


def _axes(axis_name, strategy):
    """The mesh axes as a tuple: one for ring / all_gather / ulysses, (ring, ulysses) for usp."""
    pair = isinstance(axis_name, (tuple, list))
    if strategy == "usp" and not (pair and len(axis_name) == 2):
        raise ValueError(f"strategy='usp' needs axis_name=(ring_axis, ulysses_axis), got {axis_name=}")
    if strategy in ("ring", "all_gather", "ulysses") and pair:
        raise ValueError(f"strategy={strategy!r} runs over one mesh axis, got {axis_name=}: use strategy='usp' for two")
    axes = tuple(axis_name) if pair else (axis_name,)
    if any(a is None for a in axes):
        raise ValueError(f"context_attention needs the mesh axis the sequence is sharded over, got {axis_name=}")
    for a in axes:
        ring_position(a, "context_attention")  # bound inside shard_map
    return axes


def _auto(axes, q, k, v, hardware, *, causal, layout):
    """The strategy the cost model predicts fastest among those this axis_name can run."""
    B, T, N, H = q.shape
    K = k.shape[2]
    R = 1
    for a in axes:
        R *= lax.axis_size(a)
    choice = cost.choose_strategy(
        hardware, seq_len=R * T, num_devices=R, num_heads=N, num_kv_heads=K, head_dim=H, head_dim_v=v.shape[-1],
        batch=B, dtype_bytes=jnp.dtype(q.dtype).itemsize, causal=causal, layout=layout,
    )
    runnable = ("usp",) if len(axes) == 2 else ("ring", "all_gather", "ulysses")
    return min(runnable, key=lambda s: choice.costs[s])


@dataclasses.dataclass(frozen=True, kw_only=True)
class _LocalSpec:
    """The static part of one kernel call at traced global offsets."""

    causal: bool
    window: int | None
    scale: float
    logit_soft_cap: float | None
    kernels: pallas_kernels.PerPlatform  # of Kernel
    block_sizes: BlockSizes


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(q, k, v, q_seg, kv_seg, sinks, offsets, spec):
    """One kernel call: q [B, T, N, H] at global position offsets[0] over k, v [B, S, K, H] at
    offsets[1] (int32 [2], traced), with the sinks (or None) folded in."""
    return _attend_fwd(q, k, v, q_seg, kv_seg, sinks, offsets, spec)[0]


def _kernel_args(q_seg, kv_seg, offsets, spec):
    return dict(
        scale=spec.scale, logit_soft_cap=spec.logit_soft_cap, causal=spec.causal,
        window=spec.window, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=offsets[0], kv_offset=offsets[1],
    )


def _attend_fwd(q, k, v, q_seg, kv_seg, sinks, offsets, spec):
    blocks = spec.block_sizes
    out, lse = spec.kernels.dispatch(lambda kernel: pallas_kernels.attention_fwd(
        q, k, v, impl=kernel, block_q=blocks.block_q, block_kv=blocks.block_kv,
        **_kernel_args(q_seg, kv_seg, offsets, spec),
    ))
    if sinks is not None:
        out, lse = pallas_kernels.fold_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, sinks, offsets, out, lse)


def _attend_bwd(spec, residuals, d_out):
    q, k, v, q_seg, kv_seg, sinks, offsets, out, lse = residuals
    blocks = spec.block_sizes
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dq, dk, dv = spec.kernels.dispatch(lambda kernel: pallas_kernels.attention_bwd(
        q, k, v, None, lse, d_out, impl=kernel, delta=delta, block_q=blocks.block_q_dkv,
        block_kv=blocks.block_kv_dkv, **_kernel_args(q_seg, kv_seg, offsets, spec),
    ))
    d_sinks = None if sinks is None else pallas_kernels.sinks_grad(lse, delta, sinks).astype(sinks.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, d_sinks, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _local_spec(T, S, *, causal, window, scale, logit_soft_cap, block_sizes, impl, H):
    check_window(window)
    check_block_sizes(block_sizes)
    return _LocalSpec(
        causal=bool(causal), window=window, scale=checked_scale(scale, H),
        logit_soft_cap=checked_soft_cap(logit_soft_cap), kernels=pallas_kernels.kernels_for(impl),
        block_sizes=pallas_kernels.fit_block_sizes(block_sizes, T, S),
    )


def _all_gather(
    q, k, v, q_seg, kv_seg, *, axis_name, layout, causal, window, scale, logit_soft_cap, sinks, block_sizes, impl
):
    B, T, N, H = q.shape
    R, rank = ring_position(axis_name, "context_attention")

    def gather(x):
        if x is None:
            return None
        whole = lax.all_gather(x, axis_name, axis=1, tiled=True)  # device order = layout order
        return unzigzag(whole, R) if layout == "zigzag" else whole  # natural order

    k_all, v_all, kv_seg_all = gather(k), gather(v), gather(kv_seg)
    S_all = k_all.shape[1]
    local = functools.partial(
        _local_spec, causal=causal, window=window, scale=scale, logit_soft_cap=logit_soft_cap,
        block_sizes=block_sizes, impl=impl, H=H,
    )
    if layout == "contiguous":
        return _attend(q, k_all, v_all, q_seg, kv_seg_all, sinks, offsets_operand(rank * T, 0), local(T, S_all))
    if T % 2:
        raise ValueError(f"layout='zigzag' holds two chunks per device, so the local lengths must be even, got {T=}")
    # Zigzag: this device's queries are chunks rank and 2R-1-rank of 2R, each at its own position.
    half = T // 2
    spec = local(half, S_all)
    parts = []
    for chunk, rows in ((rank, slice(0, half)), (2 * R - 1 - rank, slice(half, T))):
        ids = None if q_seg is None else q_seg[:, rows]
        offsets = offsets_operand(chunk * half, 0)
        parts.append(_attend(q[:, rows], k_all, v_all, ids, kv_seg_all, sinks, offsets, spec))
    return jnp.concatenate(parts, axis=1)


def _ulysses(
    q, k, v, q_seg, kv_seg, *, ring_axis, ulysses_axis, layout, causal, window, scale, logit_soft_cap, sinks,
    block_sizes, impl,
):
    """All-to-all over `ulysses_axis` (sequence shards -> head shards), attention over the rest of
    the sequence (whole, or round a ring over `ring_axis`), and the all-to-all back."""
    B, T, N, H = q.shape
    K = k.shape[2]
    U, u = ring_position(ulysses_axis, "context_attention")
    if N % U:
        raise ValueError(f"Ulysses splits q's N={N} heads over the {U} devices of axis {ulysses_axis!r}: N must divide")
    if K % U and U % K:
        raise ValueError(
            f"Ulysses splits k's K={K} heads over the {U} devices of axis {ulysses_axis!r}: K must divide by {U}, "
            f"or {U} by K (each device then takes the one kv head its query heads read)"
        )
    if K % U:  # U a multiple of K: device u's N/U query heads all read kv head u // (U / K)
        k, v = (jnp.repeat(x, U // K, axis=2) for x in (k, v))

    def to_heads(x):  # [B, T, heads, H] -> [B, U*T, heads/U, H], the sequence in device order
        return lax.all_to_all(x, ulysses_axis, split_axis=2, concat_axis=1, tiled=True)

    def ids_whole(ids):
        return None if ids is None else lax.all_gather(ids, ulysses_axis, axis=1, tiled=True)

    order = _UlyssesOrder(U=U, layout=layout, ring=ring_axis is not None)
    q_h, k_h, v_h = (order.arrange(to_heads(x)) for x in (q, k, v))
    q_ids, kv_ids = (None if ids is None else order.arrange(ids_whole(ids)) for ids in (q_seg, kv_seg))
    segment_ids = None if q_ids is None else (q_ids, kv_ids)
    inner_layout = layout if ring_axis is not None else "contiguous"
    heads = N // U  # this device's query heads after the all-to-all: u * heads onwards
    local_sinks = None if sinks is None else lax.dynamic_slice_in_dim(sinks, u * heads, heads)
    out = ring_attention(
        q_h, k_h, v_h, axis_name=ring_axis, causal=causal, window=window, segment_ids=segment_ids, scale=scale,
        logit_soft_cap=logit_soft_cap, sinks=local_sinks, layout=inner_layout, block_sizes=block_sizes, impl=impl,
    )
    return lax.all_to_all(order.restore(out), ulysses_axis, split_axis=1, concat_axis=2, tiled=True)


@dataclasses.dataclass(frozen=True)
class _UlyssesOrder:
    """How the U shards an all-to-all concatenates (device order over `ulysses_axis`) become the
    sequence the attention runs on, and back.

    Without a ring the U shards are the whole sequence in `layout` order: zigzag is undone into
    natural order. Within a ring (usp) they are ring position r's U consecutive device shards:
    contiguous, a contiguous block; zigzag, device r*U+u holds chunks r*U+u and 2D-1-(r*U+u) of
    2D (D = R_ring * U), so the first halves in order are ring-level chunk r and the second halves
    reversed are ring-level chunk 2R_ring-1-r, a ring-level zigzag shard.
    """

    U: int
    layout: str
    ring: bool

    def arrange(self, x):
        if self.layout != "zigzag" or self.U == 1 and self.ring:
            return x
        if not self.ring:
            return unzigzag(x, self.U)
        first, second = self._halves(x)
        return jnp.concatenate([first.reshape(self._flat(first)), second[:, ::-1].reshape(self._flat(second))], 1)

    def restore(self, x):
        if self.layout != "zigzag" or self.U == 1 and self.ring:
            return x
        if not self.ring:
            return zigzag(x, self.U)
        L = x.shape[1]
        first = x[:, : L // 2].reshape(x.shape[0], self.U, L // (2 * self.U), *x.shape[2:])
        second = x[:, L // 2 :].reshape(first.shape)[:, ::-1]
        return jnp.stack([first, second], axis=2).reshape(x.shape)

    def _halves(self, x):
        """[B, U*T, ...] -> two [B, U, T/2, ...]: each device shard's first and second half."""
        B, L = x.shape[:2]
        pieces = x.reshape(B, self.U, 2, L // (2 * self.U), *x.shape[2:])
        return pieces[:, :, 0], pieces[:, :, 1]

    @staticmethod
    def _flat(x):
        return (x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])
