"""`ring_attention`: the public entry point. It validates at trace time and hands off to the ring."""

from collections.abc import Hashable

import jax

import pallas_kernels
from pallas_kernels import BlockSizes, Impl, Kernel
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
    logit_soft_cap: float | None = None,
    sinks=None,
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
      logit_soft_cap: c > 0 caps every score s = scale * q·k to c * tanh(s / c) before masking
        (Gemma 2); None: no cap.
      sinks: float [N], one logit per query head that joins every row's softmax denominator and
        carries no value (gpt-oss); replicated over the ring, and its gradient, summed over the
        ring, is returned. None: no sinks.
      layout: how the global sequence lies on the ring, "contiguous" or "zigzag"
        (see `ring_attn.zigzag`); zigzag balances causal work across devices.
      block_sizes: kernel tiles; None picks divisors of the local lengths.
      impl: chosen for the platform the program is compiled for (that of the mesh's devices,
        else the default backend; each platform's own under a mesh with no devices, as for a
        multi-platform `jax.export`). "auto": the Pallas kernels on GPU (Triton lowering) and
        TPU (Mosaic), the portable jnp path ("xla") on CPU. "pallas": the platform's Pallas
        kernels (on CPU, the GPU kernels in interpret mode). "pallas_triton" /
        "pallas_tpu": that kernel family, interpreted off its own backend. "pallas_mgpu": the
        Mosaic GPU (Hopper: wgmma, TMA) forward and backward, interpreted off a GPU; 16-bit inputs
        only, and not chosen by "auto" / "pallas" (the README says when it will be).
        "xla": jnp everywhere.

    Returns:
      [B, T, N, H] in q's dtype; accumulation is float32 whatever the input dtype.
    """
    check_qkv(q, k, v)
    B, T, N, H = q.shape
    S = k.shape[1]
    q_seg, kv_seg = split_segment_ids(segment_ids, B, T, S)
    check_layout(layout)
    kernels = pallas_kernels.kernels_for(impl)
    ring_size, _ = ring_position(axis_name)
    if Kernel.MGPU_INTERPRET in kernels.values() and ring_size > 1:
        raise NotImplementedError(
            f"impl='pallas_mgpu' runs the Mosaic GPU kernel in interpret mode on this backend, which in this "
            f"JAX simulates one device at a time and cannot run a ring of {ring_size}: use impl='pallas_triton' "
            "(or 'xla') for a ring off the GPU, or run on a GPU"
        )
    interpreted_gpu = any(kernel.gpu and kernel.interpreted for kernel in kernels.values())
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
            f"layout='zigzag' holds two chunks per device, so the local lengths must be even, got {T=} and {S=} "
            "(ring_attention_global pads a global length of any size)"
        )
    check_window(window)
    if window is not None:
        if layout == "zigzag":
            raise NotImplementedError(
                "window with layout='zigzag': a window keeps each device's work near the diagonal, "
                "which the contiguous layout already balances; use layout='contiguous'"
            )
        if ring_size > 1 and T != S:
            raise ValueError(f"a sliding window over a ring needs equal local lengths, got {T=} and {S=}")
    check_block_sizes(block_sizes)
    sinks = checked_sinks(sinks, N, q)
    tiled_T, tiled_S = (T // 2, S // 2) if layout == "zigzag" else (T, S)
    options = dict(
        axis_name=axis_name, causal=bool(causal), window=window, scale=checked_scale(scale, H),
        logit_soft_cap=checked_soft_cap(logit_soft_cap), layout=layout,
        block_sizes=pallas_kernels.fit_block_sizes(block_sizes, tiled_T, tiled_S),
    )
    specs = kernels.map(lambda kernel: RingSpec(impl=kernel, **options))
    return ring_attention_shard(q, k, v, q_seg, kv_seg, sinks, specs)
