"""`ring_attention_global`: ring attention on global arrays, given a mesh."""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ring_attn.attention import ring_attention
from ring_attn.layout import unzigzag_shard, zigzag_shard


def ring_attention_global(
    q, k, v, *, mesh, axis_name, batch_axes=(), segment_ids=None, sinks=None, layout="contiguous", check_vma=True,
    **kwargs,
):
    """`ring_attention` on global arrays in natural order: q [B, L, N, H], k/v [B, Lk, K, H].

    Builds the `shard_map` over `mesh` that shards the sequence axis over `axis_name` and the batch
    over `batch_axes` (other mesh axes replicate). With `layout="zigzag"` it reorders the inputs
    into the zigzag layout and the output back, inside the `shard_map` by moving half shards between
    devices. Any length works: one that the ring size (2x for zigzag) does not divide is padded at
    the end, the padding masked (it lies after every real query when causal; otherwise it gets a
    segment id of its own), and the output sliced back. `sinks` [N] are replicated over the mesh.
    Other keyword arguments go to `ring_attention`.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{axis_name=} is not an axis of the mesh, whose axes are {mesh.axis_names}")
    batch_axes = tuple(batch_axes)
    if axis_name in batch_axes or any(a not in mesh.axis_names for a in batch_axes):
        raise ValueError(
            f"{batch_axes=} must name axes of the mesh {mesh.axis_names} other than the sequence's {axis_name=}"
        )
    batch_split = math.prod(mesh.shape[a] for a in batch_axes)
    B = q.shape[0] if getattr(q, "ndim", 0) >= 1 else None
    if B is not None and B % batch_split:
        raise ValueError(f"the batch B={B} must be divisible by the {batch_split} devices of {batch_axes=}")
    options = tuple(sorted(kwargs.items()))
    try:
        hash(options)
    except TypeError:  # an array among the options (a traced scale): no cache to key on
        return _sharded.__wrapped__(q, k, v, segment_ids, sinks, mesh=mesh, axis_name=axis_name,
                                    batch_axes=batch_axes, layout=layout, check_vma=check_vma, options=options)
    return _sharded(q, k, v, segment_ids, sinks, mesh=mesh, axis_name=axis_name, batch_axes=batch_axes,
                    layout=layout, check_vma=check_vma, options=options)


# Jitted so that a call outside jit compiles once per shape and options: run eagerly, a shard_map
# executes op by op and compiles its ops again at every call.
@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "batch_axes", "layout", "check_vma", "options"))
def _sharded(q, k, v, segment_ids, sinks, *, mesh, axis_name, batch_axes, layout, check_vma, options):
    kwargs = dict(options)
    multiple = 2 * mesh.shape[axis_name] if layout == "zigzag" else mesh.shape[axis_name]
    L = q.shape[1] if q.ndim >= 2 else None  # a malformed shape: ring_attention names it
    padded = L is not None and any(x.ndim >= 2 and x.shape[1] % multiple for x in (q, k, v))
    if padded:
        q, k, v, segment_ids = _pad_to_multiple(q, k, v, segment_ids, multiple, causal=kwargs.get("causal", False))
    attend = functools.partial(ring_attention, axis_name=axis_name, layout=layout, **kwargs)

    def local(q, k, v, ids, sinks):
        if layout != "zigzag":
            return attend(q, k, v, segment_ids=ids, sinks=sinks)
        q, k, v, ids = jax.tree.map(lambda x: zigzag_shard(x, axis_name), (q, k, v, ids))
        return unzigzag_shard(attend(q, k, v, segment_ids=ids, sinks=sinks), axis_name)

    seq = P(batch_axes or None, axis_name)
    out = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq, seq, seq, jax.tree.map(lambda _: seq, segment_ids), jax.tree.map(lambda _: P(), sinks)),
        out_specs=seq,
        check_vma=check_vma,
    )(q, k, v, segment_ids, sinks)
    return out[:, :L] if padded else out


def _pad_to_multiple(q, k, v, segment_ids, multiple, *, causal):
    """q, k, v and segment ids padded at the end to lengths `multiple` divides. Causal: padded
    keys come after every real query, so the mask hides them. Otherwise the padding gets a segment
    id above every real one (ids stay sorted, so the kernels still skip by id ranges)."""

    def pad(x, value=0):
        extra = -x.shape[1] % multiple
        widths = [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=value) if extra else x

    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    if causal and segment_ids is None:
        return pad(q), pad(k), pad(v), None
    if segment_ids is None:
        q_ids, kv_ids = jnp.zeros((B, L), jnp.int32), jnp.zeros((B, S), jnp.int32)
    elif isinstance(segment_ids, (tuple, list)):
        q_ids, kv_ids = segment_ids
    else:
        q_ids = kv_ids = segment_ids
    q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    if q_ids.ndim != 2 or kv_ids.ndim != 2:  # ring_attention names the argument and the shape
        return pad(q), pad(k), pad(v), segment_ids
    padding_id = jnp.maximum(q_ids.max(), kv_ids.max()).astype(jnp.int32) + 1
    ids = (pad(q_ids.astype(jnp.int32), padding_id), pad(kv_ids.astype(jnp.int32), padding_id))
    return pad(q), pad(k), pad(v), ids
