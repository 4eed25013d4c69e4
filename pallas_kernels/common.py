"""What every kernel family shares: shard_map typing of operands, the offsets operand, constants."""

import math

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def match_vma(x, *refs):
    """`x` made varying over every manual mesh axis any of `refs` varies over (shard_map typing)."""
    have = jax.typeof(x).manual_axis_type.varying
    want = frozenset().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))
    missing = tuple(sorted(want - have))
    return lax.pcast(x, missing, to="varying") if missing else x


def typed_alike(*operands):
    """The operands (None skipped; the first is never None) made varying over every shard_map axis
    any of them varies over, as for an elementwise op, and that manual axis type, which a
    pallas_call's outputs need spelled out under shard_map's vma check."""
    present = [x for x in operands if x is not None]
    operands = tuple(None if x is None else match_vma(x, *present) for x in operands)
    return operands, jax.typeof(operands[0]).manual_axis_type


def offsets_operand(q_offset, kv_offset):
    """int32 [2]: the global positions of the first query and key, traced or not, as one operand
    so that one compiled kernel serves every ring step."""
    return jnp.stack([jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_offset, jnp.int32)])


def matmul_precision(dtype):
    """float32 inputs keep float32 products (GPU dots would round them to TF32); 16-bit: default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


def scores(dot, *, scale, logit_soft_cap, base2=False):
    """Scores from the raw q·k products: `scale * dot`, soft-capped to `c * tanh(scale * dot / c)`
    when `logit_soft_cap` is c (Gemma 2), and times log2(e) when `base2` (kernels that use exp2)."""
    unit = LOG2E if base2 else 1.0
    if logit_soft_cap is None:
        return dot * (scale * unit)
    return jnp.tanh(dot * (scale / logit_soft_cap)) * (logit_soft_cap * unit)


def through_soft_cap(ds, s, *, logit_soft_cap, base2=False):
    """`ds`, the gradient with respect to the capped scores `s` (as `scores` returns them), taken
    through the cap: d(c tanh(x / c))/dx = 1 - tanh², read from `s` itself. `s` must be the capped
    score before masking (a masked -inf or MASK_VALUE would give 0 * inf)."""
    if logit_soft_cap is None:
        return ds
    tanh = s * (1.0 / (logit_soft_cap * (LOG2E if base2 else 1.0)))
    return ds * (1.0 - tanh * tanh)
