"""Blockwise SwiGLU feedforward in portable jnp (Blockwise Parallel Transformer, arXiv 2305.19370).

Tokens are processed a chunk at a time under `jax.checkpoint`, so neither the forward nor the
backward ever holds the `[B, L, F]` hidden activation: only one `[B, chunk, F]` slice of it.
"""

import jax
import jax.numpy as jnp
from jax import lax


def cotangent_like(ct, primal):
    """A kernel's float32 gradient `ct` as the cotangent of `primal`: summed over the manual mesh
    axes it varies over and `primal` does not (the transpose of the implicit broadcast inside
    `shard_map`, which a `custom_vjp` must spell out), then cast to `primal`'s dtype."""
    extra = jax.typeof(ct).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
    if extra:
        ct = lax.psum(ct, tuple(sorted(extra)))
    return ct.astype(primal.dtype)


def feedforward(x, w_gate, w_up, w_down, *, chunk_size):
    """x: [B, L, D], w_gate/w_up: [D, F], w_down: [F, D] -> [B, L, D] in x's dtype."""
    B, L, D = x.shape

    @jax.checkpoint
    def chunk(x_c):  # [B, chunk, D]
        gate = jnp.einsum("BLD,DF->BLF", x_c, w_gate, preferred_element_type=jnp.float32)
        up = jnp.einsum("BLD,DF->BLF", x_c, w_up, preferred_element_type=jnp.float32)
        hidden = (jax.nn.silu(gate) * up).astype(w_down.dtype)
        return jnp.einsum("BLF,FD->BLD", hidden, w_down, preferred_element_type=jnp.float32).astype(x.dtype)

    chunks = x.reshape(B, L // chunk_size, chunk_size, D).swapaxes(0, 1)  # [L / chunk, B, chunk, D]
    return lax.map(chunk, chunks).swapaxes(0, 1).reshape(B, L, D)
