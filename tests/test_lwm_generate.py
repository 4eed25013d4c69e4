"""Generation: the ring-sharded KV cache gives the tokens a dense forward recomputed at every step gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from model_zoo import TINY, forward, init_params, make_mesh
from model_zoo.generate import generate, sample
from model_zoo.needle import evaluate_needles, format_table

SMALL = TINY.replace(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


def dense(q, k, v, segment_ids, **score_options):
    return reference.attention(q, k, v, causal=True, **score_options)


@pytest.fixture(scope="module")
def params():
    # Scaled up from the init so that greedy choices are decided by clear margins.
    return jax.tree.map(lambda p: p * 3 if p.ndim > 1 else p, init_params(SMALL, jax.random.key(0)))


def dense_greedy(params, prompt, steps, config=SMALL):
    """Recomputes the whole sequence densely for every new token (padded to one length: causal
    attention keeps the padding after the last token out of its logits)."""
    length = len(prompt) + steps
    logits = jax.jit(lambda tokens: forward(params, tokens, config=config, attention=dense)[0])
    sequence, out = list(prompt), []
    for _ in range(steps):
        padded = jnp.asarray([sequence + [0] * (length - len(sequence))])
        out.append(int(jnp.argmax(logits(padded)[len(sequence) - 1])))
        sequence.append(out[-1])
    return out


@pytest.mark.parametrize(
    "mesh_shape, layout, strategy",
    [
        ({"sp": 8}, "contiguous", "ring"),
        ({"dp": 2, "tp": 2, "sp": 2}, "zigzag", "ring"),
        ({"sp": 2, "uly": 4}, "zigzag", "usp"),  # the cache over both sequence axes
    ],
)
@pytest.mark.slow
def test_sharded_cache_generates_the_dense_tokens(params, mesh_shape, layout, strategy):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 64, size=n)) for n in (5, 13, 2)]
    expected = [dense_greedy(params, p, 7) for p in prompts]
    config = SMALL.replace(ring_layout=layout, attention_strategy=strategy)
    with jax.set_mesh(make_mesh(**mesh_shape)):
        got = generate(params, prompts, config=config, max_new_tokens=7)
    assert got == expected


def test_soft_cap_and_sinks_in_the_cache_path(params):
    # Decoding applies the cap and folds the sinks (split over tp) as the forward does.
    config = SMALL.replace(attn_logit_soft_cap=1.0, attention_sinks=True, ring_layout="zigzag")
    sinks = jax.random.normal(jax.random.key(3), (config.num_layers, config.num_heads))
    params = {**params, "layers": {**params["layers"], "sinks": 2.0 * sinks}}
    prompts = [list(np.random.default_rng(4).integers(0, 64, size=n)) for n in (9, 3)]
    expected = [dense_greedy(params, p, 6, config) for p in prompts]
    with jax.set_mesh(make_mesh(tp=2, sp=4)):
        assert generate(params, prompts, config=config, max_new_tokens=6) == expected


def test_stop_tokens_and_streaming(params):
    prompt = list(np.random.default_rng(2).integers(0, 64, size=6))
    full = generate(params, [prompt], config=SMALL, max_new_tokens=6)[0]
    streamed = []
    stopped = generate(params, [prompt], config=SMALL, max_new_tokens=6, stop_tokens=(full[2],),
                       on_tokens=lambda step, tokens: streamed.append(int(tokens[0])))
    assert stopped == [full[: full.index(full[2]) + 1]] and streamed == stopped[0]
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        generate(params, [prompt], config=SMALL, max_new_tokens=0)
    with pytest.raises(ValueError, match="more than max_position_embeddings=2048"):
        generate(params, [prompt], config=SMALL, max_new_tokens=2048)


def test_sampling():
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((4, 50)), jnp.float32)
    key = jax.random.key(0)
    assert np.array_equal(sample(logits, key), np.argmax(logits, -1))
    # A nucleus smaller than the top token's probability keeps only the top token.
    assert np.array_equal(sample(logits, key, temperature=1.0, top_p=1e-6), np.argmax(logits, -1))
    draws = np.stack([sample(logits, jax.random.key(i), temperature=1.0, top_p=0.5) for i in range(200)])
    probs = jax.nn.softmax(logits, -1)
    for row in range(4):
        order = np.argsort(-probs[row])
        nucleus = order[: int(np.searchsorted(np.cumsum(probs[row][order]), 0.5)) + 1]
        assert set(draws[:, row]) <= set(nucleus.tolist())
    assert np.array_equal(sample(logits, key, temperature=0.7), sample(logits, key, temperature=0.7))


def test_needle_grid_runs_on_the_ring():
    """The evaluation loop end to end (an untrained model scores what it scores; the grid is well formed)."""
    config = SMALL.replace(vocab_size=1024)
    params = init_params(config, jax.random.key(1))
    with jax.set_mesh(make_mesh(sp=8)):
        scores = evaluate_needles(params, config, lengths=[128], depths=[0.0, 1.0], trials=2)
    assert scores.shape == (1, 2) and np.all((0 <= scores) & (scores <= 1))
    assert "overall accuracy" in format_table(scores, [128], [0.0, 1.0])
