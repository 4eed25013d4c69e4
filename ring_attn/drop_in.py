"""Ring attention behind the calls JAX users already make.

`dot_product_attention` takes `jax.nn.dot_product_attention`'s arguments and means what they mean
there, on global arrays whose sequence lies over a mesh axis of the mesh in context
(`jax.set_mesh`). `flax_attention_fn` returns the same for Flax NNX's
`MultiHeadAttention(attention_fn=...)`. The layout is chosen here (zigzag when causal, for equal
work per device) and never seen by the caller. What a ring cannot hold cheaply (an additive bias,
a dense [B, N, T, S] mask, the residual) raises `NotImplementedError` naming the argument: nothing
is silently dropped.
"""

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding

import pallas_kernels
from pallas_kernels import IMPLS
from ring_attn.attention import ring_attention
from ring_attn.checks import checked_int_array
from ring_attn.sharded import ring_attention_global

# The options `flax_attention_fn` passes on to `dot_product_attention` for every call.
FLAX_OPTIONS = ("scale", "local_window_size", "implementation")


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    axis_name: Hashable | None = None,
):
    """`jax.nn.dot_product_attention` as a ring over the mesh axis `axis_name`.

    Args:
      query: [B, T, N, H] or [T, N, H], global (not a shard).
      key: [B, S, K, H] or [S, K, H]; K divides N (grouped-query attention).
      value: [B, S, K, Hv] or [S, K, Hv]; Hv may differ from H (multi-head latent attention,
        which jax.nn does not take).
      bias, mask: not supported (NotImplementedError): express a mask as `is_causal`,
        `local_window_size` or sequence lengths.
      scale: score scale; None: 1 / sqrt(H).
      is_causal: query i sees keys j <= i.
      query_seq_lengths: int [B]: query rows at and past the length return 0.
      key_value_seq_lengths: int [B]: keys at and past the length are masked.
      local_window_size: w or (left, right): query i sees keys in [i - left, i + right]; an int
        is (w, w). The ring runs a window that is causal-left (`is_causal`, or right == 0) or
        symmetric; any other raises NotImplementedError.
      implementation: the kernel family, one of `ring_attn.ring_attention`'s `impl` values;
        None: "auto".
      return_residual: not supported (NotImplementedError).
      axis_name: the axis of the mesh in context (`jax.set_mesh`) that the sequence is sharded
        over; the batch stays split over the axes it lies on (for an array whose sharding is not
        known here, inside `jit` on an Auto mesh: over the other axes, as far as B divides).
        None: no ring, flash attention on the arrays as they are.

    Returns:
      query's shape with value's head dim, query's dtype. A query row that sees no key returns 0
      (jax.nn returns the mean of the values there, an artefact of its finite mask).
    """
    for name, given in (("bias", bias), ("mask", mask)):
        if given is not None:
            raise NotImplementedError(
                f"{name}: a dense [B, N, T, S] {name} is not something a ring can hold; express the mask as "
                "is_causal, local_window_size or query_seq_lengths / key_value_seq_lengths (or segment ids with "
                "ring_attn.ring_attention_global), or use jax.nn.dot_product_attention"
            )
    if return_residual:
        raise NotImplementedError(
            "return_residual: the ring does not return its log-sum-exp; use jax.nn.dot_product_attention"
        )
    impl = _impl(implementation)
    rank = getattr(query, "ndim", None)
    if rank not in (3, 4):
        shape = tuple(getattr(query, "shape", ()))
        raise ValueError(f"query must be [B, T, N, H] or [T, N, H], got shape {shape}")
    if rank == 3:
        query, key, value = (x[None] if getattr(x, "ndim", 0) == 3 else x for x in (query, key, value))
    B, T = query.shape[:2]
    S = key.shape[1] if getattr(key, "ndim", 0) == 4 else None
    causal, window = _window(bool(is_causal), local_window_size)
    segment_ids = _segment_ids(query_seq_lengths, key_value_seq_lengths, B, T, S)
    if isinstance(scale, np.generic):  # jax.nn takes a NumPy scalar too; ring_attention a Python number
        scale = scale.item()
    options = dict(causal=causal, window=window, scale=scale, impl=impl)
    if axis_name is None:
        out = ring_attention(query, key, value, segment_ids=segment_ids, **options)
    else:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                f"{axis_name=} names an axis of the mesh in context, but there is none: call inside "
                "`with jax.set_mesh(mesh):`, or pass axis_name=None for one device"
            )
        if axis_name in mesh.manual_axes:
            raise ValueError(
                f"{axis_name=} is already a manual axis (inside jax.shard_map), where arrays are local shards: "
                "call ring_attn.ring_attention on them there"
            )
        kernels = pallas_kernels.kernels_for(impl)
        out = ring_attention_global(
            query, key, value, mesh=mesh, axis_name=axis_name, batch_axes=_batch_axes(query, mesh, axis_name),
            segment_ids=segment_ids, layout="zigzag" if causal and window is None else "contiguous",
            # JAX cannot interpret the GPU kernels under the vma check (ring_attention says so)
            check_vma=not any(kernel.gpu and kernel.interpreted for kernel in kernels.values()),
            **options,
        )
    return out[0] if rank == 3 else out


def flax_attention_fn(axis_name: Hashable | None = "sp", **options):
    """An `attention_fn` for Flax NNX's `MultiHeadAttention(attention_fn=...)` that runs the ring.

    `options` (`scale`, `local_window_size`, `implementation`) go to `dot_product_attention` on
    every call; the `is_causal` Flax passes at call time is honoured. A `mask` or `bias`, dropout
    that is not deterministic, `module` (attention weights sown; the ring never forms them) or a
    `precision` raise NotImplementedError. Batch dimensions beyond one are flattened and restored,
    as Flax does. Needs no import of Flax.
    """
    unknown = sorted(set(options) - set(FLAX_OPTIONS))
    if unknown:
        raise ValueError(f"flax_attention_fn takes options {FLAX_OPTIONS}, got {unknown}")

    def attention_fn(
        query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None, dropout_rate=0.0,
        deterministic=False, dtype=None, precision=None, module=None, promote_dtype=None, is_causal=False,
    ):
        if dropout_rate > 0 and not deterministic:
            raise NotImplementedError(
                f"dropout_rate={dropout_rate} with deterministic=False: the ring's kernels have no attention "
                "dropout; call the module with deterministic=True, or set its dropout_rate=0"
            )
        if module is not None:
            raise NotImplementedError("module (sow_weights=True): the ring never forms the attention weights")
        if precision is not None:
            raise NotImplementedError(
                f"precision={precision!r}: the ring's kernels multiply in the inputs' dtype and accumulate in "
                "float32; leave precision=None"
            )
        if promote_dtype is not None:
            query, key, value = promote_dtype((query, key, value), dtype=dtype)
        else:
            common = dtype or jnp.result_type(query, key, value)
            query, key, value = (jnp.asarray(x, common) for x in (query, key, value))
        leading = query.shape[:-3]
        if len(leading) > 1:  # [batch..., L, heads, H] -> [B, L, heads, H], as Flax does
            query, key, value = (x.reshape(math.prod(x.shape[:-3]), *x.shape[-3:]) for x in (query, key, value))
        out = dot_product_attention(
            query, key, value, bias, mask, is_causal=is_causal, axis_name=axis_name, **options
        )
        return out.reshape(*leading, *out.shape[-3:])

    return attention_fn


def _impl(implementation):
    if implementation is None:
        return "auto"
    if implementation == "cudnn":
        raise NotImplementedError(
            "implementation='cudnn': cuDNN's fused attention cannot take part in a ring; use None (auto), "
            "'pallas' or one of the ring's kernel families"
        )
    if implementation not in IMPLS:
        raise ValueError(f"unknown {implementation=}; expected None or one of {IMPLS}")
    return implementation


def _window(is_causal, local_window_size):
    """(causal, window) of `ring_attention` for jax.nn's is_causal and (left, right) window."""
    if local_window_size is None:
        return is_causal, None
    pair = (local_window_size, local_window_size) if isinstance(local_window_size, int) else local_window_size
    if (
        not isinstance(pair, (tuple, list)) or len(pair) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in pair)
    ):
        raise ValueError(
            f"local_window_size must be a non-negative int or a pair (left, right) of them, got {local_window_size!r}"
        )
    left, right = pair
    # ring_attention's window counts the query itself: i - j < window (causal), |i - j| < window.
    if is_causal or right == 0:
        return True, left + 1
    if left == right:
        return False, left + 1
    raise NotImplementedError(
        f"local_window_size={local_window_size!r}: the ring runs a window that is causal-left (is_causal=True, "
        "or (left, 0)) or symmetric (w or (w, w)); use jax.nn.dot_product_attention for others"
    )


def _segment_ids(query_seq_lengths, key_value_seq_lengths, B, T, S):
    """Sequence lengths as segment ids (q_ids [B, T], kv_ids [B, S]), or None: 0 where valid, and
    padding ids that match nothing (queries 1, keys 2), so a padded query sees no key and returns 0."""
    if query_seq_lengths is None and key_value_seq_lengths is None:
        return None
    if S is None:  # ring_attention names the bad key
        S = T
    q_ids = jnp.zeros((B, T), jnp.int32)
    kv_ids = jnp.zeros((B, S), jnp.int32)
    if query_seq_lengths is not None:
        lengths = checked_int_array("query_seq_lengths", query_seq_lengths, (B,), "[B]")
        q_ids = jnp.where(jnp.arange(T) < lengths[:, None], 0, 1)
    if key_value_seq_lengths is not None:
        lengths = checked_int_array("key_value_seq_lengths", key_value_seq_lengths, (B,), "[B]")
        kv_ids = jnp.where(jnp.arange(S) < lengths[:, None], 0, 2)
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _batch_axes(x, mesh, axis_name):
    """The mesh axes the batch of `x` lies on, the sequence's axis left out. Read off the array
    where its sharding is known (a placed array; Explicit axes under jit); otherwise the other
    axes of size > 1, in mesh order, as far as their product divides the batch."""
    try:
        sharding = x.sharding  # a placed array; a tracer has none
    except AttributeError:
        sharding = None
    spec = sharding.spec if isinstance(sharding, NamedSharding) else None
    if spec is None and any(t == AxisType.Explicit for t in mesh.axis_types):
        spec = jax.typeof(x).sharding.spec
    if spec is not None:
        entry = spec[0] if len(spec) else None
        entry = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
        return tuple(a for a in entry if a != axis_name and a in mesh.axis_names)
    axes, size = [], 1
    for name in mesh.axis_names:
        if name != axis_name and mesh.shape[name] > 1 and x.shape[0] % (size * mesh.shape[name]) == 0:
            axes.append(name)
            size *= mesh.shape[name]
    return tuple(axes)
