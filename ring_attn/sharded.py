"""`ring_attention_global`: ring attention on global arrays, given a mesh."""

import functools

import jax
from jax.sharding import PartitionSpec as P

from ring_attn.attention import ring_attention
from ring_attn.layout import unzigzag, zigzag


def ring_attention_global(q, k, v, *, mesh, axis_name, segment_ids=None, layout="contiguous", check_vma=True, **kwargs):
    """`ring_attention` on global arrays in natural order: q [B, L, N, H], k/v [B, Lk, K, H].

    Builds the `shard_map` over `mesh` that shards the sequence axis over `axis_name` (other mesh
    axes replicate), and with `layout="zigzag"` reorders the inputs and restores the output.
    Other keyword arguments go to `ring_attention`.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{axis_name=} is not an axis of the mesh, whose axes are {mesh.axis_names}")
    ring_size = mesh.shape[axis_name]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", 0) >= 2 and x.shape[1] % ring_size:
            raise ValueError(
                f"{name}'s sequence length {x.shape[1]} must be divisible by the ring size {ring_size} "
                f"(mesh axis {axis_name!r})"
            )
    arrays = (q, k, v, segment_ids)
    if layout == "zigzag":
        arrays = jax.tree.map(lambda x: zigzag(x, ring_size, axis=1), arrays)
    seq = P(None, axis_name)
    attend = functools.partial(ring_attention, axis_name=axis_name, layout=layout, **kwargs)
    out = jax.shard_map(
        lambda q, k, v, ids: attend(q, k, v, segment_ids=ids),
        mesh=mesh,
        in_specs=(seq, seq, seq, jax.tree.map(lambda _: seq, segment_ids)),
        out_specs=seq,
        check_vma=check_vma,
    )(*arrays)
    return unzigzag(out, ring_size, axis=1) if layout == "zigzag" else out
