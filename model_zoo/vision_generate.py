"""Clips from captions: LWM's vision generation, frame codes sampled with classifier-free guidance.

Each prompt row runs beside an unconditional row (`<s><vision>` in LWM); at every step the vision
logits are `uncond + cfg_scale * (cond - uncond)`, restricted to the VQGAN's codes, and the sampled
code is fed to both rows. After each frame's codes `<eof>` is fed (the layout the model was trained
on), so the frame count is the caller's. The prompts are prefilled with ring attention over the
sequence-sharded mesh and decoded against the ring-sharded cache, as text generation is.

LWM generates a first frame from "Generate an image of ..." and then the rest from "Generate a
video of ..." given that frame; here all frames come from one prompt in one pass, each frame
conditioned on the ones before it, which is the same sequence without a second prefill.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.config import EOF_TOKEN
from model_zoo.generate import prompt_batch
from model_zoo.model import decode_hidden, hidden_states, vision_logits

# The guidance scale `generate-video` uses unless told: chosen for lwm-tiny-vision on 100 held-out
# clips (generated motion right 0.84 at 3, 0.91 at 2, 0.90 at 1.5, 0.57 at 5; bench/RESULTS.md).
DEFAULT_CFG_SCALE = 2.0


def sample_codes(logits, key, *, num_codes, temperature=1.0, top_k=None):
    """A code per row from vision logits [B, V]: only the first `num_codes` entries (the VQGAN's
    codebook) can be drawn; greedy at temperature 0, else from the `top_k` most likely."""
    logits = logits[:, :num_codes]
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < num_codes:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_clips(params, prompts, unconditional, *, config, frames, tokens_per_frame, num_codes,
                   cfg_scale=1.0, temperature=1.0, top_k=None, seed=0, on_frame=None):
    """Codes [len(prompts), frames, tokens_per_frame] continuing each prompt (token ids ending in
    `<vision>`), guided against `unconditional` (token ids) by `cfg_scale` (1: no guidance, and no
    unconditional row). `on_frame(index, codes [rows, tokens_per_frame])` is called as frames finish."""
    if not config.vision:
        raise ValueError("the model has no vision vocabulary (vision=False): it cannot generate frames")
    for name, value in (("frames", frames), ("tokens_per_frame", tokens_per_frame), ("num_codes", num_codes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_codes > EOF_TOKEN:
        raise ValueError(f"num_codes={num_codes} exceeds LWM's {EOF_TOKEN} vision codes")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    rows = len(prompts)
    guided = cfg_scale != 1.0
    all_prompts = list(prompts) + ([list(unconditional)] * rows if guided else [])
    steps = frames * (tokens_per_frame + 1) - 1  # every frame's codes, an <eof> between frames
    tokens, lengths, _ = prompt_batch(all_prompts, steps, config)
    logits, cache = _prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), config)
    positions = jnp.asarray(lengths)
    key = jax.random.key(seed)
    out = np.zeros((rows, frames, tokens_per_frame), np.int32)
    vision = jnp.ones((len(tokens), 1), bool)
    for f in range(frames):
        for t in range(tokens_per_frame):
            step_key = jax.random.fold_in(key, f * tokens_per_frame + t)
            codes = _guided_sample(logits, step_key, rows, cfg_scale, num_codes, temperature, top_k, guided)
            codes = np.asarray(codes)
            out[:, f, t] = codes
            fed = np.zeros(len(tokens), np.int32)
            fed[:rows] = codes
            if guided:
                fed[rows:2 * rows] = codes
            if f == frames - 1 and t == tokens_per_frame - 1:
                break
            logits, cache = _step(params, cache, jnp.asarray(fed[:, None]), positions, vision, config)
            positions = positions + 1
        if on_frame is not None:
            on_frame(f, out[:, f])
        if f < frames - 1:
            eof = jnp.full((len(tokens), 1), EOF_TOKEN, jnp.int32)
            logits, cache = _step(params, cache, eof, positions, vision, config)
            positions = positions + 1
    return out


@functools.partial(jax.jit, static_argnames=("rows", "num_codes", "temperature", "top_k", "guided"))
def _guided_sample(logits, key, rows, cfg_scale, num_codes, temperature, top_k, guided):
    cond = logits[:rows]
    if guided:
        uncond = logits[rows:2 * rows]
        cond = uncond + cfg_scale * (cond - uncond)
    return sample_codes(cond, key, num_codes=num_codes, temperature=temperature, top_k=top_k)


@functools.partial(jax.jit, static_argnames="config")
def _prefill(params, tokens, lengths, config):
    x, cache = hidden_states(params, tokens, config=config, return_cache=True)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return vision_logits(params, last), cache


@functools.partial(jax.jit, static_argnames="config", donate_argnums=1)
def _step(params, cache, tokens, positions, vision_mask, config):
    x, cache = decode_hidden(params, cache, tokens, positions, config=config, vision_mask=vision_mask)
    return vision_logits(params, x), cache


def answer_about_clips(params, config, tokenizer, codes, questions, *, max_new_tokens=32, on_tokens=None) -> list[str]:
    """Greedy answers to `questions` (one per clip), each asked about its clip's codes (int [F, n])
    as LWM's chat asks (`model_zoo.vision_data.understanding_prompt`)."""
    from model_zoo.generate import generate
    from model_zoo.vision_data import understanding_prompt

    if not config.vision:
        raise ValueError("the model has no vision vocabulary (vision=False): it cannot read a clip")
    prompts = [understanding_prompt(tokenizer, c, q) for c, q in zip(codes, questions)]
    out = generate(params, [p.tolist() for p, _ in prompts], config=config, max_new_tokens=max_new_tokens,
                   stop_tokens=(tokenizer.eos_id,), vision_masks=[m.tolist() for _, m in prompts], on_tokens=on_tokens)
    return [tokenizer.decode([t for t in tokens if t != tokenizer.eos_id]).strip() for tokens in out]


def clips_from_captions(params, config, tokenizer, captions, *, frames, tokens_per_frame, num_codes,
                        cfg_scale=DEFAULT_CFG_SCALE, temperature=1.0, top_k=None, seed=0, on_frame=None) -> np.ndarray:
    """Codes [len(captions), frames, tokens_per_frame] of a clip per caption, asked for as LWM asks
    (`model_zoo.vision_data.generation_prompt`), guided against LWM's unconditional `<s><vision>`."""
    from model_zoo.vision_data import VISION_START, generation_prompt

    prompts = [generation_prompt(tokenizer, c, video=frames > 1)[0].tolist() for c in captions]
    unconditional = [tokenizer.bos_id, *tokenizer.encode(VISION_START)]
    return generate_clips(params, prompts, unconditional, config=config, frames=frames,
                          tokens_per_frame=tokens_per_frame, num_codes=num_codes, cfg_scale=cfg_scale,
                          temperature=temperature, top_k=top_k, seed=seed, on_frame=on_frame)
