"""blockwise_feedforward against the naive SwiGLU, and its activation memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

import reference
import ring_attn


def random_ffn(seed, B, L, D, F, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = ((B, L, D), (D, F), (D, F), (F, D), (B, L, D))
    return [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2] if len(s) == 2 else 1), dtype) for s in shapes]


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_matches_reference_forward_and_gradients(chunk_size):
    x, wg, wu, wd, d_out = random_ffn(chunk_size, 2, 64, 32, 88)
    out, vjp = jax.vjp(lambda *a: ring_attn.blockwise_feedforward(*a, chunk_size=chunk_size), x, wg, wu, wd)
    grads = vjp(d_out)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, wg, wu, wd)]
        expected, vjp64 = jax.vjp(lambda *a: reference.swiglu(*a, dtype=jnp.float64), *args64)
        expected_grads = vjp64(jnp.asarray(np.asarray(d_out, np.float64)))
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)


def test_activation_memory_follows_the_chunk_not_the_length():
    B, L, D, F = 1, 4096, 64, 1024
    x, wg, wu, wd, _ = random_ffn(0, B, L, D, F)

    def temp_bytes(chunk_size):
        loss = lambda *a: ring_attn.blockwise_feedforward(*a, chunk_size=chunk_size).sum()  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, wg, wu, wd).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    hidden_bytes = B * L * F * 4  # one float32 [B, L, F] activation
    chunked = temp_bytes(128)
    whole = temp_bytes(L)
    assert chunked < hidden_bytes / 2, (
        f"chunk 128 used {chunked} temp bytes, a full hidden activation is {hidden_bytes}"
    )
    assert whole > 2 * chunked, f"one chunk of L ({whole} bytes) should need far more than chunks of 128 ({chunked})"
