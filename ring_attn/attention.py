"""`ring_attention`: the public entry point. It validates at trace time and hands off to the ring."""

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels
from pallas_kernels import BlockSizes, Impl
from ring_attn.layout import LAYOUTS
from ring_attn.ring import RingSpec, ring_attention_shard


def ring_attention(
    q,
    k,
    v,
    *,
    axis_name: Hashable | None = None,
    causal: bool = False,
    window: int | None = None,
    segment_ids=None,
    scale: float | None = None,
    layout: str = "contiguous",
    block_sizes: BlockSizes | None = None,
    impl: Impl = "auto",
):
    """Exact attention of the local query shard over the key/value shards of the whole ring.

    Args:
      q: [B, T, N, H], the local query shard.
      k, v: [B, S, K, H], the local key/value shard; K must divide N (grouped-query attention).
      axis_name: the `shard_map` mesh axis the sequence is sharded over; None: one device.
      causal: a query sees keys at its own global position and before. With a ring, T == S.
        With axis_name=None and T != S the mask is aligned top-left (query i sees keys j <= i).
      window: sliding window: a query at position i sees keys j with 0 <= i - j < window when
        causal, |i - j| < window otherwise. With a causal window and the contiguous layout the ring
        stops after the hops the window reaches, so the cost follows the window, not the length.
      segment_ids: int [B, T] for self-attention (T == S), or a pair (q_ids [B, T], kv_ids [B, S]);
        a query sees only keys with its id. A row that sees no key returns 0, with zero gradient.
      scale: score scale; None: 1 / sqrt(H).
      layout: how the global sequence lies on the ring, "contiguous" or "zigzag"
        (see `ring_attn.zigzag`); zigzag balances causal work across devices.
      block_sizes: kernel tiles; None picks divisors of the local lengths.
      impl: "auto" chooses at call time from the default backend: the Pallas kernels on GPU
        (Triton lowering) and TPU (Mosaic), the portable jnp path ("xla") on CPU. "pallas": this
        backend's Pallas kernels (on CPU, the GPU kernels in interpret mode). "pallas_triton" /
        "pallas_tpu": that kernel family, interpreted off its own backend. "pallas_mgpu": the
        Mosaic GPU (Hopper: wgmma, TMA) forward with the Triton backward, interpreted off a GPU;
        16-bit inputs only, and not chosen by "auto" / "pallas" (it has not yet run on a GPU).
        "xla": jnp everywhere.

    Returns:
      [B, T, N, H] in q's dtype; accumulation is float32 whatever the input dtype.
    """
    _check_qkv(q, k, v)
    B, T, N, H = q.shape
    S = k.shape[1]
    q_seg, kv_seg = _split_segment_ids(segment_ids, B, T, S)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown {layout=}; expected one of {LAYOUTS}")
    impl = pallas_kernels.resolve_impl(impl)
    ring_size = _ring_size(axis_name)
    if impl == "mgpu_interpret" and ring_size > 1:
        raise NotImplementedError(
            f"impl='pallas_mgpu' runs the Mosaic GPU kernel in interpret mode on this backend, which in this "
            f"JAX simulates one device at a time and cannot run a ring of {ring_size}: use impl='pallas_triton' "
            "(or 'xla') for a ring off the GPU, or run on a GPU"
        )
    interpreted_gpu = impl in ("triton_interpret", "mgpu_interpret")
    if interpreted_gpu and axis_name is not None and jax.typeof(q).manual_axis_type.varying:
        raise NotImplementedError(
            "the Pallas GPU kernels run in interpret mode on this backend, which JAX cannot run inside "
            "jax.shard_map with check_vma=True: pass check_vma=False to jax.shard_map (or to "
            "ring_attn.ring_attention_global), or use impl='xla' or impl='pallas_tpu'"
        )
    if causal and T != S and (ring_size > 1 or layout == "zigzag"):
        raise ValueError(
            f"causal ring attention needs equal local query and key lengths, got {T=} and {S=} "
            f"(ring size {ring_size}, {layout=})"
        )
    if layout == "zigzag" and (T % 2 or S % 2):
        raise ValueError(
            f"layout='zigzag' holds two chunks per device, so the local lengths must be even, got {T=} and {S=}"
        )
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if layout == "zigzag":
            raise NotImplementedError(
                "window with layout='zigzag': a window keeps each device's work near the diagonal, "
                "which the contiguous layout already balances; use layout='contiguous'"
            )
        if ring_size > 1 and T != S:
            raise ValueError(f"a sliding window over a ring needs equal local lengths, got {T=} and {S=}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a ring_attn.BlockSizes or None, got {block_sizes!r}")
    scale = _checked_scale(scale, H)
    tiled_T, tiled_S = (T // 2, S // 2) if layout == "zigzag" else (T, S)
    spec = RingSpec(
        axis_name, bool(causal), window, scale, layout, impl,
        *pallas_kernels.fit_block_sizes(block_sizes, tiled_T, tiled_S),
    )
    return ring_attention_shard(q, k, v, q_seg, kv_seg, spec)


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            expected = "[B, T, N, H]" if name == "q" else "[B, S, K, H]"
            raise ValueError(f"{name} must have rank 4, {expected}, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    (B, _, N, H), (Bk, _, K, Hk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"q and k must have the same batch size, got q {B=} and k B={Bk}")
    if H != Hk:
        raise ValueError(f"q and k must have the same head dim, got q {H=} and k H={Hk}")
    if N % K:
        raise ValueError(f"k has {K=} heads, which must divide q's {N=}")


def _checked_scale(scale, H):
    """The score scale as a float: 1 / sqrt(H) for None, else a finite Python number."""
    if scale is None:
        return 1.0 / math.sqrt(H)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number or None, got {scale!r}")
    return float(scale)


def _check_ids(name, ids, shape, dims):
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        raise ValueError(f"{name} must be an integer array, got {type(ids).__name__}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {dims} = {shape}, got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
    return ids.astype(jnp.int32)


def _split_segment_ids(segment_ids, B, T, S):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids as a sequence must be a pair (q_ids, kv_ids), got {len(segment_ids)} items")
        return (
            _check_ids("q_segment_ids", segment_ids[0], (B, T), "[B, T]"),
            _check_ids("kv_segment_ids", segment_ids[1], (B, S), "[B, S]"),
        )
    if T != S:
        raise ValueError(
            f"segment_ids [B, T] is for self-attention (T == S), got {T=} and {S=}: "
            "pass a pair (q_segment_ids, kv_segment_ids)"
        )
    ids = _check_ids("segment_ids", segment_ids, (B, T), "[B, T]")
    return ids, ids


def _ring_size(axis_name):
    if axis_name is None:
        return 1
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{axis_name=} is not bound: call ring_attention inside jax.shard_map over a mesh with "
            "that axis (or use ring_attention_global), or pass axis_name=None for one device"
        ) from None
