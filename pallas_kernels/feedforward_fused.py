"""What the fused feedforward kernel families share: padding, vma typing and the custom_vjp."""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.feedforward_xla import cotangent_like


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def pad_to(a, dtype, rows, cols):
    """`a` in `dtype`, zero-padded to [rows, cols]: exact, since zero rows/columns add nothing."""
    a = a.astype(dtype)
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def differentiable(forward, backward):
    """The feedforward (x, w_gate, w_up, w_down, spec) -> y as a custom_vjp from its kernels:
    `forward(x, w_gate, w_up, w_down, spec)` and `backward(x, w_gate, w_up, w_down, dy, spec)` ->
    (dx, dw_gate, dw_up, dw_down). The residuals are the inputs only: the backward recomputes gate
    and up tile by tile."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def feedforward(x, w_gate, w_up, w_down, spec):
        return forward(x, w_gate, w_up, w_down, spec)

    def feedforward_fwd(x, w_gate, w_up, w_down, spec):
        return forward(x, w_gate, w_up, w_down, spec), (x, w_gate, w_up, w_down)

    def feedforward_bwd(spec, residuals, dy):
        grads = backward(*residuals, dy, spec)
        return tuple(cotangent_like(g, p) for g, p in zip(grads, residuals))

    feedforward.defvjp(feedforward_fwd, feedforward_bwd)
    return feedforward
