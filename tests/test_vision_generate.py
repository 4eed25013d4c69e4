"""Vision generation and chat over clips: the ring-sharded cache, with classifier-free guidance,
gives the codes a dense forward recomputed at every step gives; a clip in the prompt reads through
the vision table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from model_zoo import TINY, init_params, make_mesh
from model_zoo.config import EOF_TOKEN
from model_zoo.generate import generate
from model_zoo.model import hidden_states, text_logits, vision_logits
from model_zoo.tokenizer import default_tokenizer
from model_zoo.vision_generate import clips_from_captions, generate_clips
from model_zoo.world_eval import next_code_accuracy

SMALL = TINY.replace(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                     vision=True)
CODES, TOKENS_PER_FRAME, FRAMES = 24, 5, 3


def dense(q, k, v, segment_ids, **score_options):
    return reference.attention(q, k, v, causal=True, **score_options)


@pytest.fixture(scope="module")
def params():
    # Scaled up from the init so that greedy choices are decided by clear margins.
    return jax.tree.map(lambda p: p * 3 if p.ndim > 1 else p, init_params(SMALL, jax.random.key(0)))


def dense_clip(params, prompt, unconditional, cfg_scale):
    """Every step recomputes both rows densely (padded to one length) and guides the vision logits."""
    length = len(prompt) + FRAMES * (TOKENS_PER_FRAME + 1)

    @jax.jit
    def last_logits(tokens, vision_mask, last):
        x = hidden_states(params, tokens, config=SMALL, vision_mask=vision_mask, attention=dense)
        return vision_logits(params, x[jnp.arange(2), last])

    rows = [(list(prompt), [False] * len(prompt)), (list(unconditional), [False] * len(unconditional))]
    codes = []
    for _frame in range(FRAMES):
        for _ in range(TOKENS_PER_FRAME):
            tokens = jnp.asarray([s + [0] * (length - len(s)) for s, _ in rows])
            mask = jnp.asarray([m + [False] * (length - len(m)) for _, m in rows])
            cond, uncond = last_logits(tokens, mask, jnp.asarray([len(s) - 1 for s, _ in rows]))
            guided = uncond + cfg_scale * (cond - uncond)
            codes.append(int(jnp.argmax(guided[:CODES])))
            for s, m in rows:
                s.append(codes[-1])
                m.append(True)
        for s, m in rows:
            s.append(EOF_TOKEN)
            m.append(True)
    return np.asarray(codes).reshape(FRAMES, TOKENS_PER_FRAME)


@pytest.mark.parametrize("mesh_shape, layout, cfg_scale", [({"sp": 8}, "contiguous", 3.0),
                                                           ({"dp": 2, "sp": 4}, "zigzag", 1.0)])
def test_guided_codes_match_a_dense_recompute(params, mesh_shape, layout, cfg_scale):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, 64, size=n)) for n in (7, 4)]
    unconditional = list(rng.integers(1, 64, size=2))
    expected = np.stack([dense_clip(params, p, unconditional, cfg_scale) for p in prompts])
    frames_seen = []
    config = SMALL.replace(ring_layout=layout)
    with jax.set_mesh(make_mesh(**mesh_shape)):
        got = generate_clips(params, prompts, unconditional, config=config, frames=FRAMES,
                             tokens_per_frame=TOKENS_PER_FRAME, num_codes=CODES, cfg_scale=cfg_scale, temperature=0.0,
                             on_frame=lambda f, codes: frames_seen.append((f, codes.copy())))
    np.testing.assert_array_equal(got, expected)
    assert [f for f, _ in frames_seen] == list(range(FRAMES))
    np.testing.assert_array_equal(np.stack([c for _, c in frames_seen], axis=1), expected)
    assert len(np.unique(expected)) > 3  # the comparison is not between constant outputs


def test_guidance_changes_the_codes_and_sampling_stays_in_the_codebook(params):
    rng = np.random.default_rng(2)
    prompt, unconditional = list(rng.integers(1, 64, size=6)), [1, 2]
    kw = dict(config=SMALL, frames=2, tokens_per_frame=TOKENS_PER_FRAME, num_codes=CODES)
    plain = generate_clips(params, [prompt], unconditional, cfg_scale=1.0, temperature=0.0, **kw)
    guided = generate_clips(params, [prompt], unconditional, cfg_scale=4.0, temperature=0.0, **kw)
    assert not np.array_equal(plain, guided)
    sampled = generate_clips(params, [prompt] * 3, unconditional, cfg_scale=2.0, temperature=1.5, top_k=6, seed=3, **kw)
    assert sampled.min() >= 0 and sampled.max() < CODES
    with pytest.raises(ValueError, match="vision=False"):
        generate_clips(params, [prompt], unconditional, **{**kw, "config": SMALL.replace(vision=False)})
    with pytest.raises(ValueError, match="num_codes=9000 exceeds LWM's 8192"):
        generate_clips(params, [prompt], unconditional, **{**kw, "num_codes": 9000})


@pytest.mark.slow
def test_a_clip_in_the_prompt_reads_through_the_vision_table(params):
    """Chat: the prompt's clip tokens (vision mask True) give the answer a dense forward gives."""
    rng = np.random.default_rng(4)
    prompt = [1, *rng.integers(1, 64, size=3), *rng.integers(0, CODES, size=8), EOF_TOKEN, *rng.integers(1, 64, 4)]
    mask = [False] * 4 + [True] * 9 + [False] * 4
    steps, sequence, expected = 5, list(prompt), []
    for _ in range(steps):
        tokens = jnp.asarray([sequence])
        vision = jnp.asarray([mask + [False] * (len(sequence) - len(mask))])
        x = hidden_states(params, tokens, config=SMALL, vision_mask=vision, attention=dense)
        expected.append(int(jnp.argmax(text_logits(params, x)[0, -1])))
        sequence.append(expected[-1])
    with jax.set_mesh(make_mesh(sp=8)):
        got = generate(params, [prompt], config=SMALL, max_new_tokens=steps, vision_masks=[mask])
        without = generate(params, [prompt], config=SMALL, max_new_tokens=steps)
    assert got == [expected]
    assert without != got  # the same ids read as text give another answer


def test_greedy_clips_are_their_own_next_code_predictions():
    """`next_code_accuracy` (teacher forcing, dense over the ring) against the cached decode: the
    codes greedy generation chose are every step's most likely code; a changed frame is not."""
    config = SMALL.replace(vocab_size=TINY.vocab_size)
    params = jax.tree.map(lambda p: p * 3 if p.ndim > 1 else p, init_params(config, jax.random.key(5)))
    tokenizer = default_tokenizer()
    captions = ["a red circle moving left", "a blue square moving up", "a white triangle moving down"]
    kw = dict(num_codes=CODES)
    with jax.set_mesh(make_mesh(sp=8)):
        codes = clips_from_captions(params, config, tokenizer, captions, frames=FRAMES,
                                    tokens_per_frame=TOKENS_PER_FRAME, cfg_scale=1.0, temperature=0.0, **kw)
        assert next_code_accuracy(params, config, tokenizer, captions, codes, **kw) == [1.0] * FRAMES
        changed = codes.copy()
        changed[:, 1] = (codes[:, 1] + np.random.default_rng(6).integers(1, CODES, codes[:, 1].shape)) % CODES
        accuracy = next_code_accuracy(params, config, tokenizer, captions, changed, **kw)
    assert len(np.unique(codes)) > 3  # not a constant clip
    assert accuracy[0] == 1.0 and accuracy[1] < 1.0  # a changed frame's first code is never the greedy one
