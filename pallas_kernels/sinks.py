"""Attention sinks (gpt-oss): one logit per query head that joins every row's softmax denominator
and carries no value, `p_j = exp(s_j) / (exp(sink) + Σ_i exp(s_i))`.

A sink is one more key whose value is zero, so it needs nothing inside a kernel: it folds exactly
into any kernel family's finished `(out, lse)`, and the backward of every family is already right
when given the folded `lse` and `delta = rowsum(d_out * out)` of the folded output. The sinks' own
gradient needs only those two statistics. Fold once per query row: in a ring, after the last merge.
"""

import jax.numpy as jnp


def _per_row(sinks):
    return sinks.astype(jnp.float32)[None, :, None]  # [N] -> [1, N, 1], against lse [B, N, T]


def fold_sinks(out, lse, sinks):
    """`(out [B, T, N, H], lse [B, N, T])` over the keys -> the same with each head's sink in the
    denominator, float32. A row that saw no key keeps out 0; its lse becomes the sink."""
    folded = jnp.logaddexp(lse, _per_row(sinks))
    keep = jnp.exp(lse - folded)  # exp(-inf) = 0 for a row that saw no key
    return out * jnp.swapaxes(keep, 1, 2)[..., None], folded


def sinks_grad(lse, delta, sinks):
    """float32 [N]: the gradient of the sinks, from the folded `lse` [B, N, T] and `delta`
    [B, N, T] = rowsum(d_out * out) of the folded output. d out / d sink = -p_sink out, so each
    row gives -p_sink * delta."""
    p_sink = jnp.exp(_per_row(sinks) - lse)
    return -(p_sink * delta).sum(axis=(0, 2))
