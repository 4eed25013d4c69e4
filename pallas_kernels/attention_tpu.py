"""Blockwise (flash) attention as TPU Pallas (Mosaic) kernels: the kernel contract of `attention_xla`.

Same inputs, outputs and masking rules as `attention_xla.attention_fwd` / `attention_bwd`, so the
two are interchangeable. Layout: q/k/v stay `[B, L, heads, H]` in HBM, viewed as `[B, L, heads * Hp]`
with H zero-padded to a lane multiple `Hp`, so one head of one tile is a `[block, Hp]` block that the
BlockSpec DMAs directly (no transposes; no copy at all when H is a multiple of 128). v, the output
and its gradient have their own head dim Hv (DeepSeek's MLA: H = 192, Hv = 128), padded the same
way to `Hvp`: each array is padded to its own width only. Grouped-query attention is an index map:
query head n reads key/value head n // (N // K).

Global positions `q_offset` / `kv_offset` are scalar-prefetched (traced scalars are fine), so one
compiled kernel serves every ring step. Tiles that causality, the window or disjoint segment ids
hide entirely are skipped with `pl.when`; for causality and the window the index maps also clamp
the streamed block index into the visible range, so a skipped tile repeats the previous block
index and is not fetched again.

Grids (the streamed axis innermost, "arbitrary"; the others "parallel"):
- forward and dq: (B, N, q blocks, kv blocks);
- dk/dv: (B, K, kv blocks, G = N // K, q blocks): the sum over the query heads of a group happens
  inside the kernel, in the float32 accumulators, so no per-query-head dk/dv is materialised.

`attention_fwd_ring_step` is the forward with the ring's transfer inside it: an in-kernel remote
DMA passes the k/v shard in hand to the next device while the kernel computes on it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention_xla import position_conditions
from pallas_kernels.common import offsets_operand, scores, through_soft_cap, typed_alike

# Finite, so masked scores never make inf - inf; rows that see no key are detected and zeroed.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NUM_LANES = 128
# A running max above this has seen a real score, not only MASK_VALUE.
_SEEN_THRESHOLD = 0.5 * MASK_VALUE
# Barrier semaphore of the ring-step kernel. Every call of it synchronises the same way (each
# device with its two neighbours on one mesh axis), which is when kernels may share one id.
RING_COLLECTIVE_ID = 7
# dot_general dimension numbers: a @ b and a @ b.T.
_NN_DIMS = (((1,), (0,)), ((), ()))
_NT_DIMS = (((1,), (1,)), ((), ()))


def attention_fwd(
    q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0,
    causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv, interpret=None,
):
    """q: [B, T, N, H], k: [B, S, K, H], v: [B, S, K, Hv] -> (out [B, T, N, Hv] f32, lse [B, N, T] f32).

    A query at global position i sees the key at j when causal allows (i >= j), the segment ids
    match, and within a `window`: 0 <= i - j < window (causal) or |i - j| < window.
    Rows that see no key give out 0 and lse -inf. `interpret`: None compiles for TPU; pass
    `pltpu.InterpretParams()` to run anywhere.
    """
    B, T, N, H = q.shape
    K, Hv = k.shape[2], v.shape[3]
    mask = _checked_mask(q, k, v, q_segment_ids, kv_segment_ids, causal, window, block_q, block_kv, interpret)
    Hp, Hvp = _padded_head_dim(H), _padded_head_dim(Hv)
    prefetch = _scalar_prefetch(mask, q_offset, kv_offset, q_segment_ids, kv_segment_ids)
    q_ids, kv_ids = _ids_as_rows(q_segment_ids), _ids_as_rows(kv_segment_ids)
    operands, vma = typed_alike(
        *prefetch, _heads_minor(q, Hp), _heads_minor(k, Hp), _heads_minor(v, Hvp), q_ids, kv_ids
    )
    build = functools.partial(
        _build_fwd, mask, B=B, N=N, K=K, Hp=Hp, Hvp=Hvp, scale=scale, logit_soft_cap=logit_soft_cap, vma=vma,
        interpret=interpret,
    )
    out, lse = build()(*operands)
    return _heads_split(out, N, Hv), lse[..., 0]


def attention_bwd(
    q, k, v, out, lse, d_out, *, delta=None, q_segment_ids=None, kv_segment_ids=None,
    q_offset=0, kv_offset=0, causal=False, window=None, scale, logit_soft_cap=None, block_q, block_kv,
    interpret=None,
):
    """Gradients of `attention_fwd`'s out: float32 `(dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv])`.

    `out` and `d_out` are [B, T, N, Hv]. `lse` [B, N, T] is the log-sum-exp over every key the rows
    saw (in a ring: all steps), and `delta` [B, N, T] = rowsum(d_out * out) of the final output;
    computed here when None (then `out` is needed, otherwise it may be None). dk/dv of a key/value
    head sum over the query heads of its group inside the dk/dv kernel.
    """
    B, T, N, H = q.shape
    K, Hv = k.shape[2], v.shape[3]
    mask = _checked_mask(q, k, v, q_segment_ids, kv_segment_ids, causal, window, block_q, block_kv, interpret)
    if delta is None:
        if out is None:
            raise ValueError("attention_bwd needs `out` or `delta`")
        delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    Hp, Hvp = _padded_head_dim(H), _padded_head_dim(Hv)
    prefetch = _scalar_prefetch(mask, q_offset, kv_offset, q_segment_ids, kv_segment_ids)
    q_ids, kv_ids = _ids_as_rows(q_segment_ids), _ids_as_rows(kv_segment_ids)
    # A row that saw no key has lse -inf: +inf instead makes its p = exp(s - lse) exactly 0.
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse.astype(jnp.float32))[:, :, None, :]  # [B, N, 1, T]
    delta = delta.astype(jnp.float32)[:, :, None, :]
    q_, k_, v_, do_ = _heads_minor(q, Hp), _heads_minor(k, Hp), _heads_minor(v, Hvp), _heads_minor(d_out, Hvp)
    operands, vma = typed_alike(*prefetch, q_, k_, v_, do_, lse, delta, q_ids, kv_ids)
    common = dict(
        B=B, N=N, K=K, Hp=Hp, Hvp=Hvp, scale=scale, logit_soft_cap=logit_soft_cap, vma=vma, interpret=interpret
    )
    dq = _build_bwd_dq(mask, **common)(*operands)
    dk, dv = _build_bwd_dkv(mask, **common)(*operands)
    return _heads_split(dq, N, H), _heads_split(dk, K, H), _heads_split(dv, K, Hv)


def attention_fwd_ring_step(
    q, k, v, *, axis_name, q_segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0,
    causal=False, scale, logit_soft_cap=None, block_q, block_kv, interpret=None,
):
    """`attention_fwd` on the k/v shard in hand, which the same kernel passes on round the ring.

    Called inside `jax.shard_map` over `axis_name`, by every device of the ring at once. At its
    first grid step the kernel meets its neighbours (barrier semaphore: the next device is inside
    its own call, so its receive buffers exist) and starts remote DMAs of k, v and kv_segment_ids
    from HBM to the next device's receive buffers (outputs of the same call there: a second buffer,
    so nothing being read is overwritten); the attention tiles are computed while the copies fly,
    and the last grid step waits for the outgoing and the incoming copies. The grid therefore runs
    in order on one core (every dimension "arbitrary").

    Returns `((out, lse), (k_next, v_next, kv_segment_ids_next))`: the partial attention exactly as
    `attention_fwd` returns it, and the shard of the previous device on the ring (ids None when
    not given).
    """
    B, T, N, H = q.shape
    K, Hv = k.shape[2], v.shape[3]
    mask = _checked_mask(q, k, v, q_segment_ids, kv_segment_ids, causal, None, block_q, block_kv, interpret)
    Hp, Hvp = _padded_head_dim(H), _padded_head_dim(Hv)
    ring_size, rank = lax.axis_size(axis_name), lax.axis_index(axis_name)
    # In SMEM, not lax.axis_index in the kernel: interpret mode cannot run that under check_vma=True.
    neighbours = jnp.stack([(rank + ring_size - 1) % ring_size, (rank + 1) % ring_size]).astype(jnp.int32)
    prefetch = (*_scalar_prefetch(mask, q_offset, kv_offset, q_segment_ids, kv_segment_ids), neighbours)
    q_ids, kv_ids = _ids_as_rows(q_segment_ids), _ids_as_rows(kv_segment_ids)
    operands, vma = typed_alike(
        *prefetch, _heads_minor(q, Hp), _heads_minor(k, Hp), _heads_minor(v, Hvp), q_ids, kv_ids, k, v, kv_ids
    )
    build = functools.partial(
        _build_fwd, mask, B=B, N=N, K=K, Hp=Hp, Hvp=Hvp, scale=scale, logit_soft_cap=logit_soft_cap, vma=vma,
        interpret=interpret,
    )
    out, lse, k_next, v_next, kv_ids_next = build(ring=_RingPass(axis_name, k.shape, v.shape, k.dtype))(*operands)
    kv_next = (k_next, v_next, None if kv_ids_next is None else kv_ids_next[:, 0, :])
    return (_heads_split(out, N, Hv), lse[..., 0]), kv_next


@dataclasses.dataclass(frozen=True)
class _RingPass:
    """What `_build_fwd` needs to pass the k/v shard on: the mesh axis, the shapes of k
    ([B, S, K, H]) and v ([B, S, K, Hv]) as they travel, and their dtype."""

    axis_name: object
    k_shape: tuple
    v_shape: tuple
    kv_dtype: object


def _segment_specs(mask, q_ids_index, kv_ids_index):
    if not mask.segments:
        return [None, None]
    return [pl.BlockSpec((None, 1, mask.block_q), q_ids_index), pl.BlockSpec((None, 1, mask.block_kv), kv_ids_index)]


def _build_fwd(mask, *, B, N, K, Hp, Hvp, scale, logit_soft_cap, vma, interpret, ring=None):
    """The forward `pallas_call`; with `ring` (a `_RingPass`), the ring-step kernel that also
    sends the whole held shard (extra HBM inputs) into the next device's receive buffers (extra
    HBM outputs, each of its own array's shape), with one send and one receive DMA semaphore per
    array."""
    bq, bk, G = mask.block_q, mask.block_kv, N // K
    T = mask.num_q_blocks * bq
    kv_rows_index = functools.partial(_kv_rows_index, mask=mask, group=G)
    in_specs = [pl.BlockSpec((None, bq, Hp), _q_rows_index), pl.BlockSpec((None, bk, Hp), kv_rows_index),
                pl.BlockSpec((None, bk, Hvp), kv_rows_index),
                *_segment_specs(mask, _q_ids_index, functools.partial(_kv_ids_index, mask=mask))]
    out_specs = [pl.BlockSpec((None, bq, Hvp), _q_rows_index),
                 pl.BlockSpec((None, None, bq, NUM_LANES), _lse_out_index)]
    out_shape = [
        jax.ShapeDtypeStruct((B, T, N * Hvp), jnp.float32, manual_axis_type=vma),
        # Lane-replicated, as Mosaic keeps a per-row statistic; the caller keeps lane 0.
        jax.ShapeDtypeStruct((B, N, T, NUM_LANES), jnp.float32, manual_axis_type=vma),
    ]
    scratch_shapes = [
        pltpu.VMEM((bq, NUM_LANES), jnp.float32),
        pltpu.VMEM((bq, NUM_LANES), jnp.float32),
        pltpu.VMEM((bq, Hvp), jnp.float32),
    ]
    kernel = functools.partial(_fwd_kernel, mask=mask, scale=scale, logit_soft_cap=logit_soft_cap)
    params = dict(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    if ring is not None:
        whole = pl.BlockSpec(memory_space=pl.ANY)
        ids = whole if mask.segments else None
        in_specs += [whole, whole, ids]
        out_specs += [whole, whole, ids]
        k_next, v_next = (
            jax.ShapeDtypeStruct(shape, ring.kv_dtype, manual_axis_type=vma) for shape in (ring.k_shape, ring.v_shape)
        )
        ids_next = jax.ShapeDtypeStruct((B, 1, ring.k_shape[1]), jnp.int32, manual_axis_type=vma)
        out_shape += [k_next, v_next, ids_next if mask.segments else None]
        scratch_shapes += [pltpu.SemaphoreType.DMA((3,)), pltpu.SemaphoreType.DMA((3,))]
        kernel = functools.partial(
            _fwd_ring_step_kernel, mask=mask, scale=scale, logit_soft_cap=logit_soft_cap, axis_name=ring.axis_name
        )
        params = dict(dimension_semantics=("arbitrary",) * 4, collective_id=RING_COLLECTIVE_ID)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3 if ring is None else 4,
            grid=(B, N, mask.num_q_blocks, mask.num_kv_blocks),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch_shapes,
        ),
        compiler_params=pltpu.CompilerParams(**params),
        interpret=False if interpret is None else interpret,
        name="ring_attn_tpu_fwd" if ring is None else "ring_attn_tpu_fwd_ring_step",
    )


def _build_bwd_dq(mask, *, B, N, K, Hp, Hvp, scale, logit_soft_cap, vma, interpret):
    bq, bk, G = mask.block_q, mask.block_kv, N // K
    T = mask.num_q_blocks * bq
    kv_rows_index = functools.partial(_kv_rows_index, mask=mask, group=G)
    q_spec = pl.BlockSpec((None, bq, Hp), _q_rows_index)
    stat_spec = pl.BlockSpec((None, None, 1, bq), _q_stat_index)
    in_specs = [q_spec, pl.BlockSpec((None, bk, Hp), kv_rows_index), pl.BlockSpec((None, bk, Hvp), kv_rows_index),
                pl.BlockSpec((None, bq, Hvp), _q_rows_index), stat_spec, stat_spec,
                *_segment_specs(mask, _q_ids_index, functools.partial(_kv_ids_index, mask=mask))]
    return pl.pallas_call(
        functools.partial(_bwd_dq_kernel, mask=mask, scale=scale, logit_soft_cap=logit_soft_cap),
        out_shape=jax.ShapeDtypeStruct((B, T, N * Hp), jnp.float32, manual_axis_type=vma),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, N, mask.num_q_blocks, mask.num_kv_blocks),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, Hp), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=False if interpret is None else interpret,
        name="ring_attn_tpu_bwd_dq",
    )


def _build_bwd_dkv(mask, *, B, N, K, Hp, Hvp, scale, logit_soft_cap, vma, interpret):
    bq, bk, G = mask.block_q, mask.block_kv, N // K
    S = mask.num_kv_blocks * bk
    q_rows_index = functools.partial(_dkv_q_rows_index, mask=mask, group=G)
    k_spec = pl.BlockSpec((None, bk, Hp), _dkv_kv_rows_index)
    v_spec = pl.BlockSpec((None, bk, Hvp), _dkv_kv_rows_index)
    stat_spec = pl.BlockSpec((None, None, 1, bq), functools.partial(_dkv_q_stat_index, mask=mask, group=G))
    in_specs = [pl.BlockSpec((None, bq, Hp), q_rows_index), k_spec, v_spec,
                pl.BlockSpec((None, bq, Hvp), q_rows_index), stat_spec, stat_spec,
                *_segment_specs(mask, functools.partial(_dkv_q_ids_index, mask=mask), _dkv_kv_ids_index)]
    return pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, mask=mask, scale=scale, logit_soft_cap=logit_soft_cap),
        out_shape=[
            jax.ShapeDtypeStruct((B, S, K * Hp), jnp.float32, manual_axis_type=vma),
            jax.ShapeDtypeStruct((B, S, K * Hvp), jnp.float32, manual_axis_type=vma),
        ],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, K, mask.num_kv_blocks, G, mask.num_q_blocks),
            in_specs=in_specs,
            out_specs=[k_spec, v_spec],
            scratch_shapes=[pltpu.VMEM((bk, Hp), jnp.float32), pltpu.VMEM((bk, Hvp), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=False if interpret is None else interpret,
        name="ring_attn_tpu_bwd_dkv",
    )


def _checked_mask(q, k, v, q_segment_ids, kv_segment_ids, causal, window, block_q, block_kv, interpret):
    """The static masking rules, after validating shapes and block sizes."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"expected q [B, T, N, H], k [B, S, K, H] and v [B, S, K, Hv]; got {q.shape}, {k.shape}, {v.shape}"
        )
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    if k.shape[0] != B or k.shape[3] != H:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}")
    if T % block_q or S % block_kv:
        raise ValueError(f"block_q={block_q} must divide T={T} and block_kv={block_kv} must divide S={S}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != (B, T) or kv_segment_ids.shape != (B, S)):
        raise ValueError(f"segment ids must be [B, T] and [B, S]; got {q_segment_ids.shape}, {kv_segment_ids.shape}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window <= 0):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if interpret is None:
        # Per-row statistics and segment ids are lane-major [1, block] tiles on TPU.
        for name, block, length in (("block_q", block_q, T), ("block_kv", block_kv, S)):
            if block % NUM_LANES and block != length:
                raise ValueError(
                    f"on TPU {name}={block} must be a multiple of {NUM_LANES} or the whole length {length}"
                )
    return TileMask(
        causal=bool(causal), window=None if window is None else int(window), segments=q_segment_ids is not None,
        block_q=block_q, block_kv=block_kv, num_q_blocks=T // block_q, num_kv_blocks=S // block_kv,
    )


def _padded_head_dim(H):
    return -(-H // NUM_LANES) * NUM_LANES


def _heads_minor(x, Hp):
    """[B, L, heads, H] -> [B, L, heads * Hp]: head h is the lane-aligned column block h."""
    if x.shape[-1] != Hp:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, Hp - x.shape[-1])))
    return x.reshape(*x.shape[:2], -1)


def _heads_split(x, heads, H):
    """[B, L, heads * Hp] -> [B, L, heads, H]."""
    return x.reshape(*x.shape[:2], heads, -1)[..., :H]


def _ids_as_rows(ids):
    """[B, L] -> [B, 1, L]: a tile's ids are a lane-major [1, block] row."""
    return None if ids is None else ids.astype(jnp.int32)[:, None, :]


def _scalar_prefetch(mask, q_offset, kv_offset, q_segment_ids, kv_segment_ids):
    """SMEM operands: the two offsets and, with segments, each tile's (min, max) segment id."""
    offsets = offsets_operand(q_offset, kv_offset)
    if not mask.segments:
        return offsets, None, None
    return offsets, _tile_id_ranges(q_segment_ids, mask.block_q), _tile_id_ranges(kv_segment_ids, mask.block_kv)


def _tile_id_ranges(ids, block):
    """[B, L] -> flat [B * (L // block) * 2]: (min, max) id per tile (1-D: SMEM pads 2-D arrays)."""
    B, L = ids.shape
    tiles = ids.astype(jnp.int32).reshape(B, L // block, block)
    return jnp.stack([tiles.min(-1), tiles.max(-1)], axis=-1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class TileMask:
    """Static masking rules: which tiles may hold a visible pair, and the mask inside a tile."""

    causal: bool
    window: int | None
    segments: bool
    block_q: int
    block_kv: int
    num_q_blocks: int
    num_kv_blocks: int

    def bounds(self, i, j, offsets_ref):
        """Global (q_first, q_last, kv_first, kv_last) of tiles i and j."""
        q_first = offsets_ref[0] + i * self.block_q
        kv_first = offsets_ref[1] + j * self.block_kv
        return q_first, q_first + self.block_q - 1, kv_first, kv_first + self.block_kv - 1

    def tile_visible(self, b, i, j, offsets_ref, q_range_ref, kv_range_ref):
        """Scalar bool (None: always) that some query of tile i may see some key of tile j."""
        q_first, q_last, kv_first, kv_last = self.bounds(i, j, offsets_ref)
        conditions = position_conditions(q_first, q_last, kv_first, kv_last, causal=self.causal, window=self.window)
        if self.segments:
            # Disjoint id ranges share no id; with sorted ids (packing) every such tile is caught.
            qi, kj = 2 * (b * self.num_q_blocks + i), 2 * (b * self.num_kv_blocks + j)
            conditions.append(
                jnp.logical_and(q_range_ref[qi] <= kv_range_ref[kj + 1], kv_range_ref[kj] <= q_range_ref[qi + 1])
            )
        return functools.reduce(jnp.logical_and, conditions) if conditions else None

    def clamp_kv_block(self, i, j, offsets_ref):
        """kv block j moved into the range query tile i may see: skipped steps refetch nothing."""
        if not self.causal and self.window is None:
            return j
        q_first, q_last, _, _ = self.bounds(i, 0, offsets_ref)
        kv_offset, count = offsets_ref[1], self.num_kv_blocks
        lo = hi = None
        if self.window is not None:
            lo = _block_of(q_first - self.window + 1 - kv_offset, self.block_kv, count)
        if self.causal:
            hi = _block_of(q_last - kv_offset, self.block_kv, count)
        elif self.window is not None:
            hi = _block_of(q_last + self.window - 1 - kv_offset, self.block_kv, count)
        return _clamp(j, lo, hi)

    def clamp_q_block(self, i, j, offsets_ref):
        """q block i moved into the range whose queries may see key tile j."""
        if not self.causal and self.window is None:
            return i
        _, _, kv_first, kv_last = self.bounds(0, j, offsets_ref)
        q_offset, count = offsets_ref[0], self.num_q_blocks
        lo = hi = None
        if self.causal:
            lo = _block_of(kv_first - q_offset, self.block_q, count)
        elif self.window is not None:
            lo = _block_of(kv_first - self.window + 1 - q_offset, self.block_q, count)
        if self.window is not None:
            hi = _block_of(kv_last + self.window - 1 - q_offset, self.block_q, count)
        return _clamp(i, lo, hi)

    def element_mask(self, q_pos, kv_pos, q_ids, kv_ids):
        """Bool tile (None: all visible) from int32 position tiles and broadcastable id tiles."""
        masks = []
        if self.causal or self.window is not None:
            distance = q_pos - kv_pos
        if self.causal:
            masks.append(distance >= 0)
        if self.window is not None:
            masks.append(distance < self.window)
            if not self.causal:
                masks.append(distance > -self.window)
        if self.segments:
            masks.append(q_ids == kv_ids)
        return functools.reduce(jnp.logical_and, masks) if masks else None


def _block_of(position, block, count):
    """Index of the block holding `position`, clamped into [0, count); positions are int32 scalars."""
    return jnp.minimum(lax.div(jnp.maximum(position, 0), jnp.int32(block)), count - 1)


def _clamp(index, lo, hi):
    if lo is not None:
        index = jnp.maximum(index, lo)
    if hi is not None:
        index = jnp.minimum(index, hi)
    return index


def _when(condition, body):
    """`pl.when` that also takes None for an always-true condition."""
    if condition is None:
        body()
    else:
        pl.when(condition)(body)


def _lanes(x, n):
    """A lane-replicated [rows, 128] statistic as [rows, n] (or [rows, 1], which broadcasts)."""
    if n == NUM_LANES:
        return x
    if n % NUM_LANES == 0:
        return jnp.tile(x, (1, n // NUM_LANES))
    if n < NUM_LANES:
        return x[:, :n]
    return x[:, :1]


# Index maps. Grid (b, n, i, j) for the forward and dq; (b, kv_head, j, g, i) for dk/dv. The
# trailing arguments are the scalar-prefetch refs (offsets, q id ranges, kv id ranges).


def _q_rows_index(b, n, i, j, offsets_ref, *_):
    return b, i, n


def _q_stat_index(b, n, i, j, offsets_ref, *_):
    return b, n, 0, i


def _q_ids_index(b, n, i, j, offsets_ref, *_):
    return b, 0, i


def _kv_rows_index(b, n, i, j, offsets_ref, *_, mask, group):
    return b, mask.clamp_kv_block(i, j, offsets_ref), lax.div(n, group)  # n >= 0: floor division


def _kv_ids_index(b, n, i, j, offsets_ref, *_, mask):
    return b, 0, mask.clamp_kv_block(i, j, offsets_ref)


def _lse_out_index(b, n, i, j, offsets_ref, *_):
    return b, n, i, 0


def _dkv_q_rows_index(b, h, j, g, i, offsets_ref, *_, mask, group):
    return b, mask.clamp_q_block(i, j, offsets_ref), h * group + g


def _dkv_q_stat_index(b, h, j, g, i, offsets_ref, *_, mask, group):
    return b, h * group + g, 0, mask.clamp_q_block(i, j, offsets_ref)


def _dkv_q_ids_index(b, h, j, g, i, offsets_ref, *_, mask):
    return b, 0, mask.clamp_q_block(i, j, offsets_ref)


def _dkv_kv_rows_index(b, h, j, g, i, offsets_ref, *_):
    return b, j, h


def _dkv_kv_ids_index(b, h, j, g, i, offsets_ref, *_):
    return b, 0, j


def _masked_scores(q, k, mask, i, j, offsets_ref, q_ids_ref, kv_ids_ref, *, scale, logit_soft_cap):
    """`(masked, s)`: the (soft-capped) scores [bq, bk] of tile (i, j), with and without
    MASK_VALUE where a query may not see a key."""
    s = scores(lax.dot_general(q, k, _NT_DIMS, preferred_element_type=jnp.float32), scale=scale,
               logit_soft_cap=logit_soft_cap)
    q_first, _, kv_first, _ = mask.bounds(i, j, offsets_ref)
    visible = mask.element_mask(
        q_first + lax.broadcasted_iota(jnp.int32, s.shape, 0),
        kv_first + lax.broadcasted_iota(jnp.int32, s.shape, 1),
        None if q_ids_ref is None else jnp.expand_dims(q_ids_ref[0], -1),  # [bq, 1]
        None if kv_ids_ref is None else kv_ids_ref[...],  # [1, bk]
    )
    return (s if visible is None else jnp.where(visible, s, MASK_VALUE)), s


def _fwd_kernel(
    offsets_ref, q_range_ref, kv_range_ref,  # scalar prefetch (SMEM)
    q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref,  # inputs
    o_ref, lse_ref,  # outputs
    m_scratch_ref, l_scratch_ref, acc_scratch_ref,
    *, mask, scale, logit_soft_cap,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bk, Hvp = mask.block_kv, acc_scratch_ref.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_scratch_ref[...] = jnp.full(m_scratch_ref.shape, MASK_VALUE, jnp.float32)
        l_scratch_ref[...] = jnp.zeros(l_scratch_ref.shape, jnp.float32)
        acc_scratch_ref[...] = jnp.zeros(acc_scratch_ref.shape, jnp.float32)

    def _compute():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s, _ = _masked_scores(q, k, mask, i, j, offsets_ref, q_ids_ref, kv_ids_ref, scale=scale,
                              logit_soft_cap=logit_soft_cap)  # [bq, bk]
        m_prev, l_prev = m_scratch_ref[...], l_scratch_ref[...]  # [bq, 128], lanes equal
        m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])
        p = jnp.exp(s - _lanes(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)
        l_scratch_ref[...] = alpha * l_prev + p.sum(axis=-1)[:, None]
        m_scratch_ref[...] = m_next
        pv = lax.dot_general(p.astype(v.dtype), v, _NN_DIMS, preferred_element_type=jnp.float32)
        acc_scratch_ref[...] = _lanes(alpha, Hvp) * acc_scratch_ref[...] + pv

    _when(mask.tile_visible(b, i, j, offsets_ref, q_range_ref, kv_range_ref), _compute)

    @pl.when(j == mask.num_kv_blocks - 1)
    def _finish():
        m, l = m_scratch_ref[...], l_scratch_ref[...]
        # Rows whose max is still MASK_VALUE saw no key (l counted masked entries): out 0, lse -inf.
        seen = m > _SEEN_THRESHOLD
        l_safe = jnp.where(seen, l, 1.0)
        inv_l = jnp.where(seen, 1.0 / l_safe, 0.0)
        o_ref[...] = acc_scratch_ref[...] * _lanes(inv_l, Hvp)
        lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _fwd_ring_step_kernel(
    offsets_ref, q_range_ref, kv_range_ref, neighbours_ref,  # scalar prefetch (SMEM)
    q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref,  # inputs, tiled (VMEM)
    k_hbm_ref, v_hbm_ref, kv_ids_hbm_ref,  # the held shard, whole (HBM): what is sent
    o_ref, lse_ref,  # outputs, tiled
    k_next_ref, v_next_ref, kv_ids_next_ref,  # receive buffers (HBM), written by the previous device
    m_scratch_ref, l_scratch_ref, acc_scratch_ref, send_sem_ref, recv_sem_ref,
    *, mask, scale, logit_soft_cap, axis_name,
):
    left, right = neighbours_ref[0], neighbours_ref[1]
    pairs = [(k_hbm_ref, k_next_ref), (v_hbm_ref, v_next_ref)]
    if mask.segments:
        pairs.append((kv_ids_hbm_ref, kv_ids_next_ref))
    copies = [
        pltpu.make_async_remote_copy(
            src_ref=src, dst_ref=dst, send_sem=send_sem_ref.at[c], recv_sem=recv_sem_ref.at[c],
            device_id={axis_name: right}, device_id_type=pl.DeviceIdType.MESH,
        )
        for c, (src, dst) in enumerate(pairs)
    ]
    grid = range(4)  # (b, n, i, j), run in order

    @pl.when(functools.reduce(jnp.logical_and, [pl.program_id(d) == 0 for d in grid]))
    def _start():
        # Tell the previous device that this call's receive buffers exist; wait until the next
        # device says the same of its own, then send.
        barrier_sem_ref = pltpu.get_barrier_semaphore()
        pl.semaphore_signal(barrier_sem_ref, 1, device_id={axis_name: left}, device_id_type=pl.DeviceIdType.MESH)
        pl.semaphore_wait(barrier_sem_ref, 1)
        for copy in copies:
            copy.start()

    _fwd_kernel(
        offsets_ref, q_range_ref, kv_range_ref, q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref,
        m_scratch_ref, l_scratch_ref, acc_scratch_ref, mask=mask, scale=scale, logit_soft_cap=logit_soft_cap,
    )

    @pl.when(functools.reduce(jnp.logical_and, [pl.program_id(d) == pl.num_programs(d) - 1 for d in grid]))
    def _finish():
        # The held shard is no longer read, and the next shard has arrived.
        for copy in copies:
            copy.wait_send()
            copy.wait_recv()


def _bwd_dq_kernel(
    offsets_ref, q_range_ref, kv_range_ref,  # scalar prefetch (SMEM)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,  # inputs
    dq_ref,  # output
    dq_scratch_ref,
    *, mask, scale, logit_soft_cap,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scratch_ref[...] = jnp.zeros(dq_scratch_ref.shape, jnp.float32)

    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        masked, s = _masked_scores(q, k, mask, i, j, offsets_ref, q_ids_ref, kv_ids_ref, scale=scale,
                                   logit_soft_cap=logit_soft_cap)  # [bq, bk]
        p = jnp.exp(masked - jnp.expand_dims(lse_ref[0], -1))  # lse [bq, 1]; masked entries give 0
        dp = lax.dot_general(do.astype(v.dtype), v, _NT_DIMS, preferred_element_type=jnp.float32)
        ds = through_soft_cap(p * (dp - jnp.expand_dims(delta_ref[0], -1)), s, logit_soft_cap=logit_soft_cap)
        dq_scratch_ref[...] += lax.dot_general(ds.astype(k.dtype), k, _NN_DIMS, preferred_element_type=jnp.float32)

    _when(mask.tile_visible(b, i, j, offsets_ref, q_range_ref, kv_range_ref), _compute)

    @pl.when(j == mask.num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = dq_scratch_ref[...] * scale


def _bwd_dkv_kernel(
    offsets_ref, q_range_ref, kv_range_ref,  # scalar prefetch (SMEM)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,  # inputs
    dk_ref, dv_ref,  # outputs
    dk_scratch_ref, dv_scratch_ref,
    *, mask, scale, logit_soft_cap,
):
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_scratch_ref[...] = jnp.zeros(dk_scratch_ref.shape, jnp.float32)
        dv_scratch_ref[...] = jnp.zeros(dv_scratch_ref.shape, jnp.float32)

    def _compute():
        # Transposed scores [bk, bq]: the per-query statistics are lane-major rows, as loaded.
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = scores(lax.dot_general(k, q, _NT_DIMS, preferred_element_type=jnp.float32), scale=scale,
                     logit_soft_cap=logit_soft_cap)
        q_first, _, kv_first, _ = mask.bounds(i, j, offsets_ref)
        visible = mask.element_mask(
            q_first + lax.broadcasted_iota(jnp.int32, s_t.shape, 1),
            kv_first + lax.broadcasted_iota(jnp.int32, s_t.shape, 0),
            None if q_ids_ref is None else q_ids_ref[...],  # [1, bq]
            None if kv_ids_ref is None else jnp.expand_dims(kv_ids_ref[0], -1),  # [bk, 1]
        )
        masked_t = s_t if visible is None else jnp.where(visible, s_t, MASK_VALUE)
        p_t = jnp.exp(masked_t - lse_ref[...])  # lse [1, bq]; masked entries give 0
        dv_scratch_ref[...] += lax.dot_general(p_t.astype(do.dtype), do, _NN_DIMS, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do.astype(v.dtype), _NT_DIMS, preferred_element_type=jnp.float32)
        ds_t = through_soft_cap(p_t * (dp_t - delta_ref[...]), s_t, logit_soft_cap=logit_soft_cap)
        dk_scratch_ref[...] += lax.dot_general(ds_t.astype(q.dtype), q, _NN_DIMS, preferred_element_type=jnp.float32)

    _when(mask.tile_visible(b, i, j, offsets_ref, q_range_ref, kv_range_ref), _compute)

    @pl.when(jnp.logical_and(g == pl.num_programs(3) - 1, i == mask.num_q_blocks - 1))
    def _finish():
        dk_ref[...] = dk_scratch_ref[...] * scale
        dv_ref[...] = dv_scratch_ref[...]
