"""ring_attn.flax_attention_fn in Flax NNX's MultiHeadAttention, against Flax's own attention, on a
2 x 4 (data x sequence) mesh: outputs, every parameter's gradient, and a few training steps."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, random_qkv
from test_drop_in import data_sequence_mesh

import ring_attn

nnx = pytest.importorskip("flax.nnx", reason="the [flax] extra is not installed")

VOCAB, WIDTH, HEADS = 64, 32, 4


class TinyLM(nnx.Module):
    """Embedding, one causal attention block with a residual, and a head."""

    def __init__(self, attention_fn, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=WIDTH, decode=False, attention_fn=attention_fn, rngs=rngs
        )
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        return self.head(x + self.attention(x, is_causal=True))


def attention_module(attention_fn):
    return nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=WIDTH, decode=False, attention_fn=attention_fn, rngs=nnx.Rngs(0)
    )


def module_output_and_grads(module, x, d_out, is_causal):
    """The module's output and the gradient of <output, d_out> for each parameter, under jit."""
    graphdef, params = nnx.split(module, nnx.Param)

    @jax.jit
    def run(params, x):
        def apply(params):
            return nnx.merge(graphdef, params)(x, is_causal=is_causal)

        out, vjp = jax.vjp(apply, params)
        return out, vjp(d_out)[0]

    out, grads = run(params, x)
    return np.asarray(out), {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree.leaves_with_path(grads)}


@pytest.mark.parametrize("is_causal", [True, False])
def test_module_matches_flax(is_causal):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, WIDTH)), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal((2, 64, WIDTH)), jnp.float32)
    expected, expected_grads = module_output_and_grads(attention_module(nnx.dot_product_attention), x, d_out, is_causal)
    with jax.set_mesh(data_sequence_mesh()):
        ring = attention_module(ring_attn.flax_attention_fn("sp"))
        out, grads = module_output_and_grads(ring, x, d_out, is_causal)
    assert_close(out, expected, name="out")
    assert grads.keys() == expected_grads.keys()
    largest = max(np.abs(g).max() for g in expected_grads.values())
    for name, g in grads.items():
        assert_close(g, expected_grads[name], kind="gradient", name=f"d{name}", floor=largest)


def test_attention_fn_matches_nnx_dot_product_attention_with_two_batch_dims():
    q, k, v, _ = random_qkv(1, 4, 32, 4, 2, 16)
    q, k, v = (x.reshape(2, 2, *x.shape[1:]) for x in (q, k, v))
    expected = nnx.dot_product_attention(q, k, v, is_causal=True)
    with jax.set_mesh(data_sequence_mesh()):
        out = jax.jit(ring_attn.flax_attention_fn("sp"), static_argnames="is_causal")(q, k, v, is_causal=True)
    assert out.shape == q.shape
    assert_close(out, expected, name="out")


@pytest.mark.slow
def test_training_reaches_the_same_losses():
    # One batch of random tokens seen eight times: memorising it makes the loss fall.
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 65)), jnp.int32)

    def losses(attention_fn):
        graphdef, params = nnx.split(TinyLM(attention_fn, nnx.Rngs(0)), nnx.Param)
        optimizer = optax.adam(1e-2)
        state = optimizer.init(params)

        @jax.jit
        def step(params, state, tokens):
            def loss_fn(params):
                logits = nnx.merge(graphdef, params)(tokens[:, :-1])
                return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        history = []
        for _ in range(8):
            params, state, loss = step(params, state, tokens)
            history.append(float(loss))
        return np.array(history)

    expected = losses(nnx.dot_product_attention)
    with jax.set_mesh(data_sequence_mesh()):
        actual = losses(ring_attn.flax_attention_fn("sp"))
    assert expected[-1] < expected[0] - 0.5, f"the model should learn: {expected}"
    np.testing.assert_allclose(actual, expected, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask=jnp.ones((2, 1, 16, 16), bool)), "mask: a dense"),
        (dict(bias=jnp.zeros((2, 1, 16, 16))), "bias: a dense"),
        (dict(dropout_rate=0.1, deterministic=False), "dropout_rate=0.1 with deterministic=False"),
        (dict(precision="highest"), "precision='highest'"),
        (dict(module=object()), "module"),
    ],
)
def test_what_the_ring_cannot_do_raises(kwargs, match):
    q, k, v, _ = random_qkv(2, 2, 16, 4, 4, 16)
    with jax.set_mesh(data_sequence_mesh()), pytest.raises(NotImplementedError, match=match):
        ring_attn.flax_attention_fn("sp")(q, k, v, **kwargs)


def test_deterministic_dropout_runs():
    q, k, v, _ = random_qkv(3, 2, 16, 4, 4, 16)
    with jax.set_mesh(data_sequence_mesh()):
        out = ring_attn.flax_attention_fn("sp")(q, k, v, dropout_rate=0.1, deterministic=True)
    assert_close(out, nnx.dot_product_attention(q, k, v), name="out")


def test_unknown_option_raises():
    with pytest.raises(ValueError, match=r"flax_attention_fn takes options .* got \['causal'\]"):
        ring_attn.flax_attention_fn("sp", causal=True)


def test_ring_attn_imports_without_flax():
    blocked = (
        "import sys\n"
        "class NoFlax:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flax' or name.startswith('flax.'):\n"
        "            raise ImportError('flax is blocked')\n"
        "sys.meta_path.insert(0, NoFlax())\n"
        "import ring_attn\n"
        "ring_attn.flax_attention_fn('sp')\n"
        "assert 'flax' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
