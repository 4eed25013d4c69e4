"""`ring_attention_global`: ring attention on global arrays, given a mesh."""

import functools

import jax
from jax.sharding import PartitionSpec as P

from ring_attn.attention import ring_attention
from ring_attn.layout import unzigzag_shard, zigzag_shard


def ring_attention_global(q, k, v, *, mesh, axis_name, segment_ids=None, layout="contiguous", check_vma=True, **kwargs):
    """`ring_attention` on global arrays in natural order: q [B, L, N, H], k/v [B, Lk, K, H].

    Builds the `shard_map` over `mesh` that shards the sequence axis over `axis_name` (other mesh
    axes replicate). With `layout="zigzag"` it reorders the inputs into the zigzag layout and the
    output back, inside the `shard_map` by moving half shards between devices. Other keyword
    arguments go to `ring_attention`.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{axis_name=} is not an axis of the mesh, whose axes are {mesh.axis_names}")
    ring_size = mesh.shape[axis_name]
    shards = 2 * ring_size if layout == "zigzag" else ring_size
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", 0) >= 2 and x.shape[1] % shards:
            what = (
                f"the ring size {ring_size}" if shards == ring_size else f"{shards}, twice the ring size {ring_size},"
            )
            raise ValueError(
                f"{name}'s sequence length {x.shape[1]} must be divisible by {what} "
                f"(mesh axis {axis_name!r}, {layout=})"
            )
    attend = functools.partial(ring_attention, axis_name=axis_name, layout=layout, **kwargs)

    def local(q, k, v, ids):
        if layout != "zigzag":
            return attend(q, k, v, segment_ids=ids)
        q, k, v, ids = jax.tree.map(lambda x: zigzag_shard(x, axis_name), (q, k, v, ids))
        return unzigzag_shard(attend(q, k, v, segment_ids=ids), axis_name)

    seq = P(None, axis_name)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq, seq, seq, jax.tree.map(lambda _: seq, segment_ids)),
        out_specs=seq,
        check_vma=check_vma,
    )(q, k, v, segment_ids)
