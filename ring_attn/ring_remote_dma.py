"""The TPU ring whose k/v transfer is an in-kernel remote DMA, double-buffered against compute.

`ring_attention` moves k/v round the ring with `lax.ppermute` between kernel calls and leaves the
overlap to XLA. Here each ring step is one `pallas_call` (`attention_tpu.attention_fwd_ring_step`)
that starts the remote copy of the k/v shard it holds (and the kv segment ids) into the next
device's receive buffers (one per array, each of that array's shape: v may be narrower or wider
than k, as in DeepSeek's MLA), computes the flash-attention partial `(out, lse)` of the local
queries against that shard while the copy flies, and waits for its outgoing and incoming copies
before it returns. The held shard and the receive buffers are distinct arrays (double buffering),
and each call begins with a barrier-semaphore handshake with its neighbours, so no device writes
into a buffer before its owner has entered the call that owns it. The last step sends nothing.
Partials merge in float32 exactly as in `ring.merge`.

Causal (contiguous layout): every step runs the kernel with global positions; a step whose shard
lies wholly in the future has every tile skipped inside the kernel (no compute, no k/v tile
fetched), but its kernel still forwards the shard, so the ring keeps turning.

The gradient is the ppermute ring's backward (`ring.backward`), from the same residuals
(out and the float32 lse of the whole ring): there the k/v shards and the travelling dk/dv
accumulators move with `lax.ppermute`, not by remote DMA.

Tested on CPU in TPU interpret mode (`pltpu.InterpretParams`, which simulates the remote DMAs and
semaphores between devices) inside `jax.shard_map(..., check_vma=False)`; it also runs under the
default `check_vma=True`, and lowers for TPU through Mosaic.
Not covered: the zigzag layout and a sliding window (NotImplementedError); `jax.vmap` is untried.
"""

import dataclasses
import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from pallas_kernels import BlockSizes, Kernel, attention_tpu
from ring_attn import ring
from ring_attn.checks import (
    check_block_sizes,
    check_layout,
    check_qkv,
    checked_scale,
    checked_sinks,
    checked_soft_cap,
    ring_position,
    split_segment_ids,
)


def ring_attention_remote_dma(
    q,
    k,
    v,
    *,
    axis_name: Hashable | None,
    causal: bool = False,
    segment_ids=None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    layout: str = "contiguous",
    window: int | None = None,
    logit_soft_cap: float | None = None,
    sinks=None,
    interpret: pltpu.InterpretParams | bool | None = None,
):
    """`ring_attn.ring_attention` with the Pallas TPU kernels, the k/v transfer of each ring step
    being a remote DMA inside that step's kernel. Call it inside `jax.shard_map` over `axis_name`.

    Args:
      q: [B, T, N, H], the local query shard.
      k, v: k [B, S, K, H], v [B, S, K, Hv], the local key/value shard; K must divide N, and Hv
        may differ from H (MLA).
      axis_name: the mesh axis the sequence is sharded over (contiguously); None: one device.
      causal, segment_ids, scale, block_sizes, logit_soft_cap, sinks: as for `ring_attn.ring_attention`.
      layout: only "contiguous"; "zigzag" raises NotImplementedError.
      window: only None; a sliding window raises NotImplementedError.
      interpret: None compiles for TPU when the program is compiled for a TPU and runs the
        kernels in TPU interpret mode (`pltpu.InterpretParams()`) elsewhere; False compiles for TPU; a
        `pltpu.InterpretParams` runs the forward with it (the backward's kernels interpret with
        the defaults).

    Returns:
      [B, T, N, Hv] in q's dtype. Differentiable; the backward is the ppermute ring's.
    """
    check_qkv(q, k, v)
    B, T, N, H = q.shape
    S = k.shape[1]
    q_seg, kv_seg = split_segment_ids(segment_ids, B, T, S)
    check_layout(layout)
    if layout != "contiguous":
        raise NotImplementedError(
            f"ring_attention_remote_dma supports layout='contiguous' only, got {layout=}: its kernel "
            "masks by the global positions of one contiguous shard; use ring_attn.ring_attention("
            "..., layout='zigzag', impl='pallas_tpu'), whose transfers are ppermutes"
        )
    if window is not None:
        raise NotImplementedError(
            f"ring_attention_remote_dma has no sliding window, got {window=}: use "
            "ring_attn.ring_attention(..., window=..., impl='pallas_tpu'), whose transfers are ppermutes"
        )
    ring_size, _ = ring_position(axis_name, "ring_attention_remote_dma")
    if causal and T != S and ring_size > 1:
        raise ValueError(f"causal ring attention needs equal local query and key lengths, got {T=} and {S=}")
    check_block_sizes(block_sizes)
    sinks = checked_sinks(sinks, N, q)
    options = dict(
        axis_name=axis_name, causal=bool(causal), window=None, scale=checked_scale(scale, H),
        logit_soft_cap=checked_soft_cap(logit_soft_cap), layout="contiguous",
        block_sizes=pallas_kernels.fit_block_sizes(block_sizes, T, S),
    )
    specs = _interpret_per_platform(interpret).map(lambda interpret: _Spec(
        ring.RingSpec(impl=Kernel.TPU if interpret is None else Kernel.TPU_INTERPRET, **options), interpret,
    ))
    return _remote_dma_ring(q, k, v, q_seg, kv_seg, sinks, specs)


def _interpret_per_platform(interpret):
    """Per platform, None to compile for TPU or the `InterpretParams` to run the kernels with.
    None asks for TPU kernels where the program is compiled for a TPU, the interpreter elsewhere."""
    if interpret is None:
        target = pallas_kernels.target_platform()
        if target == "any":
            return pallas_kernels.PerPlatform(pltpu.InterpretParams(), (("tpu", None),))
        return pallas_kernels.PerPlatform(None if target == "tpu" else pltpu.InterpretParams())
    if interpret is False:
        return pallas_kernels.PerPlatform(None)
    if isinstance(interpret, pltpu.InterpretParams):
        return pallas_kernels.PerPlatform(interpret)
    raise ValueError(
        "interpret must be None (TPU interpret mode off TPU), False (compile for TPU) or a "
        f"jax.experimental.pallas.tpu.InterpretParams, got {interpret!r}: remote DMA needs the "
        "TPU interpreter, which interpret=True does not select"
    )


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call: the ring's (shared with the ppermute backward) and how the
    forward's kernels run (None: compiled for TPU)."""

    ring: ring.RingSpec
    interpret: pltpu.InterpretParams | None


def _forward(spec, q, k, v, q_seg, kv_seg):
    """float32 (out [B, T, N, Hv], lse [B, N, T]) over the whole ring."""
    rs = spec.ring
    ring_size, rank = ring_position(rs.axis_name)
    B, T, N, _ = q.shape
    S, Hv = k.shape[1], v.shape[3]
    masking = dict(
        q_segment_ids=q_seg, q_offset=rank * T, causal=rs.causal, scale=rs.scale, logit_soft_cap=rs.logit_soft_cap,
        block_q=rs.block_sizes.block_q, block_kv=rs.block_sizes.block_kv, interpret=spec.interpret,
    )

    def attend(kv, src, *, send):
        """The partial over the shard of rank `src` in hand, and (send=True) the next shard."""
        k_, v_, kv_seg_ = kv
        kwargs = dict(masking, kv_segment_ids=kv_seg_, kv_offset=src * S)
        if send:
            return attention_tpu.attention_fwd_ring_step(q, k_, v_, axis_name=rs.axis_name, **kwargs)
        return attention_tpu.attention_fwd(q, k_, v_, **kwargs), None

    # The empty partial (out 0, lse -inf) merges exactly: the first step's result is unchanged.
    like = (q, k, v)
    out = pallas_kernels.match_vma(jnp.zeros((B, T, N, Hv), jnp.float32), *like)
    lse = pallas_kernels.match_vma(jnp.full((B, N, T), -jnp.inf, jnp.float32), *like)
    kv = (k, v, kv_seg)
    if ring_size > 1:

        def step(state, s):
            out, lse, kv = state
            (out_s, lse_s), kv_next = attend(kv, (rank - s) % ring_size, send=True)
            return (*ring.merge(out, lse, out_s, lse_s), kv_next), None

        (out, lse, kv), _ = lax.scan(step, (out, lse, kv), jnp.arange(ring_size - 1))
    (out_s, lse_s), _ = attend(kv, (rank - (ring_size - 1)) % ring_size, send=False)
    return ring.merge(out, lse, out_s, lse_s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _remote_dma_ring(q, k, v, q_seg, kv_seg, sinks, specs):
    return _remote_dma_ring_fwd(q, k, v, q_seg, kv_seg, sinks, specs)[0]


def _remote_dma_ring_fwd(q, k, v, q_seg, kv_seg, sinks, specs):
    out, lse = specs.dispatch(_forward, q, k, v, q_seg, kv_seg)
    if sinks is not None:
        out, lse = pallas_kernels.fold_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, sinks, out, lse)


def _remote_dma_ring_bwd(specs, residuals, d_out):
    return specs.map(lambda spec: spec.ring).dispatch(ring.backward, residuals, d_out)


_remote_dma_ring.defvjp(_remote_dma_ring_fwd, _remote_dma_ring_bwd)
