"""`blockwise_feedforward`: the LLaMA SwiGLU feedforward, a chunk of tokens at a time."""

import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import Impl

DEFAULT_CHUNK = 512


def blockwise_feedforward(x, w_gate, w_up, w_down, *, chunk_size: int | None = None, impl: Impl = "auto"):
    """down(silu(x @ w_gate) * (x @ w_up)) with activation memory O(chunk) forward and backward.

    Args:
      x: [B, L, D]; w_gate, w_up: [D, F]; w_down: [F, D].
      chunk_size: tokens per chunk, dividing L; None: the largest divisor of L up to 512.
      impl: "auto" or "xla": jnp chunks under `jax.checkpoint`, each a [B, chunk, F] hidden
        slice ("auto" picks them on every backend, decided at call time, until a measurement on
        the hardware shows the fused kernels faster). "pallas" (this backend's family; on CPU the Triton kernels
        interpreted), "pallas_triton", "pallas_tpu": fused Pallas kernels over the B * L tokens,
        forward and backward, that keep only [token tile, hidden tile] pieces of the hidden
        activation on chip and never write it to HBM; `chunk_size` is their token tile, rounded
        up to what the family accepts (Triton: a power of two in [16, 64]; TPU: a multiple of 16
        up to 256). Interpreted (off their own backend) they are slow, and meant for tests.
        "pallas_mgpu" names an attention kernel; its feedforward is the Triton one.
    Returns:
      [B, L, D] in x's dtype; gradients in each input's dtype, accumulated in float32.
    """
    for name, a, rank in (("x", x, 3), ("w_gate", w_gate, 2), ("w_up", w_up, 2), ("w_down", w_down, 2)):
        if getattr(a, "ndim", None) != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {getattr(a, 'shape', None)}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")
    B, L, D = x.shape
    F = w_gate.shape[1]
    for name, a, shape in (("w_gate", w_gate, (D, F)), ("w_up", w_up, (D, F)), ("w_down", w_down, (F, D))):
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape} for x with {D=} and w_gate with {F=}, got {a.shape}")
    if chunk_size is None:
        chunk_size = max(c for c in range(1, min(L, DEFAULT_CHUNK) + 1) if L % c == 0)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0 or L % chunk_size:
        raise ValueError(f"chunk_size must be a positive int dividing the token count {L=}, got {chunk_size!r}")
    return pallas_kernels.feedforward(x, w_gate, w_up, w_down, impl=impl, chunk_size=chunk_size)
