"""The LWM model: ring attention over an 8-device "sp" axis against the same model with dense attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

import reference
from model_zoo import LWM_7B, TINY, LWMConfig, forward, init_params, make_mesh, preset
from model_zoo.config import LWM_7B_128K, LWM_7B_512K
from model_zoo.sharding import param_shardings
from model_zoo.train import loss_fn

SMALL = TINY.replace(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


def dense(q, k, v, segment_ids, **score_options):
    return reference.attention(
        q, k, v, causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, **score_options
    )


def random_batch(seed, B, L, vocab):
    rng = np.random.default_rng(seed)
    segments = np.sort(rng.integers(1, 4, size=(B, L)), axis=1).astype(np.int32)
    positions = np.zeros((B, L), np.int32)
    for b in range(B):
        for s in np.unique(segments[b]):
            idx = np.flatnonzero(segments[b] == s)
            positions[b, idx] = np.arange(len(idx))
    return {
        "inputs": rng.integers(0, vocab, size=(B, L)).astype(np.int32),
        "targets": rng.integers(0, vocab, size=(B, L)).astype(np.int32),
        "segment_ids": segments,
        "positions": positions,
        "loss_mask": (rng.random((B, L)) < 0.8).astype(np.float32),
    }


def random_params(config, seed):
    # Larger than the init so attention patterns are far from uniform and mistakes show.
    params = init_params(config, jax.random.key(seed))
    params = jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p + 0.1 * jnp.arange(p.shape[-1]) / p.shape[-1], params)
    if config.attention_sinks:  # initialised to 0; random here, so that each head's sink differs
        params["layers"]["sinks"] = jax.random.normal(jax.random.key(seed + 1), params["layers"]["sinks"].shape)
    return params


def test_presets_and_overrides():
    assert (LWM_7B.hidden_size, LWM_7B.intermediate_size, LWM_7B.num_layers, LWM_7B.num_heads) == (4096, 11008, 32, 32)
    assert (LWM_7B.vocab_size, LWM_7B.rms_norm_eps, LWM_7B.rope_theta) == (32000, 1e-6, 5e7)
    assert LWM_7B.max_position_embeddings == 1_048_576 and LWM_7B.head_dim == 128
    assert 6.6e9 < LWM_7B.num_params < 6.8e9  # LLaMA-2 7B: 6.74B
    assert (LWM_7B_128K.rope_theta, LWM_7B_512K.rope_theta) == (1e7, 2.5e7)
    vision = LWM_7B.replace(vision=True)
    assert vision.vision_vocab_size == 8448  # LWM's vision checkpoints' rows
    assert preset("tiny") is TINY
    with pytest.raises(ValueError, match=r"unknown LWMConfig field\(s\) \['hidden'\]"):
        TINY.replace(hidden=3)
    with pytest.raises(ValueError, match="num_heads=3"):
        TINY.replace(num_heads=3)
    with pytest.raises(ValueError, match="remat must be one of"):
        TINY.replace(remat="some")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    assert LWMConfig.from_dict(TINY.to_dict()) == TINY


@pytest.mark.parametrize(
    "mesh_shape, layout, remat, strategy, gemma_cap_and_sinks",
    [
        ({"sp": 8}, "contiguous", "full", "ring", False),
        # A Gemma-2-style soft-cap and gpt-oss-style sinks, the sinks' heads split over tp.
        ({"dp": 2, "tp": 2, "sp": 2}, "zigzag", "dots", "ring", True),
        # Ulysses over uly inside a ring over sp, heads also split over tp: the model passes its
        # strategy and sequence axes through (each strategy is checked against the oracle in
        # test_context_attention.py).
        ({"tp": 2, "sp": 2, "uly": 2}, "zigzag", "full", "usp", True),
    ],
)
@pytest.mark.slow
def test_ring_model_matches_dense_model(mesh_shape, layout, remat, strategy, gemma_cap_and_sinks):
    """Logits and loss gradients (the sinks' included): the model with its sequence sharded (a
    ring, or another context_attention strategy) vs dense attention on one device."""
    config = SMALL.replace(ring_layout=layout, remat=remat, attention_strategy=strategy)
    if gemma_cap_and_sinks:
        config = config.replace(attn_logit_soft_cap=1.0, attention_sinks=True)  # scores reach ±1.5
    params = random_params(config, 0)
    batch = random_batch(1, 2, 64, config.vocab_size)
    logits = functools.partial(forward, segment_ids=batch["segment_ids"], positions=batch["positions"], config=config)

    with jax.default_matmul_precision("highest"):
        want_logits = jax.jit(lambda p: logits(p, batch["inputs"], attention=dense))(params)
        want_grads = jax.jit(jax.grad(lambda p: loss_with_attention(p, batch, config, dense)))(params)
    mesh = make_mesh(**mesh_shape)
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, param_shardings(params, mesh))
        got_logits = jax.jit(lambda p: logits(p, batch["inputs"]))(placed)
        got_grads = jax.jit(jax.grad(loss_fn), static_argnums=2)(placed, batch, config)
    assert_close(got_logits, want_logits, name="logits")
    for path, got in jax.tree_util.tree_leaves_with_path(got_grads):
        want = functools.reduce(lambda t, k: t[k.key], path, want_grads)
        assert_close(got, want, kind="gradient", name=f"grad {jax.tree_util.keystr(path)}")


def loss_with_attention(params, batch, config, attention):
    """loss_fn with the attention replaced: the same per-row normalised cross entropy."""
    logits = forward(params, batch["inputs"], config=config, segment_ids=batch["segment_ids"],
                     positions=batch["positions"], attention=attention)
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    return jnp.mean(jnp.sum(ce * mask, 1) / jnp.sum(mask, 1))


def test_packed_documents_do_not_see_each_other():
    """Changing one packed document changes no other document's logits (on the ring)."""
    config = SMALL
    params = random_params(config, 2)
    batch = random_batch(3, 1, 64, config.vocab_size)
    changed = batch["inputs"].copy()
    second = batch["segment_ids"][0] == 2
    changed[0, second] = (changed[0, second] + 1 + np.arange(second.sum())) % config.vocab_size
    mesh = make_mesh(sp=8)
    with jax.set_mesh(mesh):
        run = jax.jit(lambda tokens: forward(params, tokens, config=config, segment_ids=batch["segment_ids"],
                                             positions=batch["positions"]))
        before, after = np.asarray(run(batch["inputs"])), np.asarray(run(changed))
    assert np.array_equal(before[0, ~second], after[0, ~second])
    assert not np.allclose(before[0, second], after[0, second])


def test_vision_tokens_use_their_own_table_and_head():
    config = SMALL.replace(vision=True)
    params = random_params(config, 4)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, config.vocab_size, size=(1, 16)).astype(np.int32)
    vision_mask = np.zeros((1, 16), bool)
    vision_mask[0, 4:12] = True
    tokens[vision_mask] = rng.integers(0, config.vision_vocab_size, size=8)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones_like(tokens),
             "positions": np.arange(16)[None].astype(np.int32), "loss_mask": np.ones((1, 16), np.float32),
             "vision_inputs": vision_mask, "vision_targets": np.roll(vision_mask, -1, 1)}
    loss = loss_fn(params, batch, config)
    # The vision rows of the embedding matter; swapping them for text rows changes the loss.
    swapped = dict(params, vision_embed=params["vision_embed"][::-1])
    assert np.isfinite(loss) and not np.isclose(loss, loss_fn(swapped, batch, config))
    with pytest.raises(ValueError, match="vision_mask was given but the config has vision=False"):
        forward(random_params(SMALL, 0), tokens, config=SMALL, vision_mask=vision_mask)


def test_bad_shapes_are_named():
    params = random_params(SMALL, 0)
    with pytest.raises(ValueError, match="tokens must be an int array"):
        forward(params, np.zeros((2, 8), np.float32), config=SMALL)
    with pytest.raises(ValueError, match="positions must have the tokens' shape"):
        forward(params, np.ones((2, 8), np.int32), config=SMALL, positions=np.ones((2, 4), np.int32))
    with jax.set_mesh(make_mesh(sp=8)):
        with pytest.raises(ValueError, match=r"sequence length 12 must be divisible by the 8 devices it lies over "
                                             r"\(sp=8 x uly=1\)"):
            forward(params, np.ones((1, 12), np.int32), config=SMALL)
    with pytest.raises(ValueError, match="num_kv_heads=2 must be divisible by the tp axis size 4"):
        with jax.set_mesh(make_mesh(tp=4, sp=2)):
            forward(params, np.ones((1, 8), np.int32), config=SMALL)
