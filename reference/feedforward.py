"""Naive SwiGLU feedforward (LLaMA): down(silu(x @ gate) * (x @ up))."""

import jax
import jax.numpy as jnp


def swiglu(x, w_gate, w_up, w_down, *, dtype=jnp.float32):
    """x: [B, L, D], w_gate/w_up: [D, F], w_down: [F, D] -> [B, L, D] in `dtype`."""
    x, w_gate, w_up, w_down = (a.astype(dtype) for a in (x, w_gate, w_up, w_down))
    with jax.default_matmul_precision("highest"):
        hidden = jax.nn.silu(x @ w_gate) * (x @ w_up)
        return hidden @ w_down
