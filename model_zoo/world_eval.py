"""Scores a vision model on the procedural world (`model_zoo.world`): the VQGAN's reconstruction
error, the answer accuracy per question kind, and, for clips generated from captions, whether the
dominant colour is the caption's and the shape moves the captioned way (read from the pixels).

Two figures say where a miss comes from: the same pixel scorers on the VQGAN's reconstructions of
the true clips (what a model that wrote the true codes would score: the VQGAN's ceiling), and how
often the model's most likely code is the true one, frame by frame, with the true clip before it
(a model that carries the last frame forward predicts later frames better than the first)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo import world
from model_zoo.vision_generate import DEFAULT_CFG_SCALE, answer_about_clips, clips_from_captions
from model_zoo.vqgan_train import reconstruction_error


def normalise_answer(text: str) -> str:
    """The answer's first word, lower case, without punctuation."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def generated_matches(frames, clip: world.Clip) -> dict[str, bool]:
    """Whether generated frames show the caption's colour and motion (a clip the scorers cannot read
    counts as a miss)."""
    result = {}
    for kind, scorer, want in (("colour", world.dominant_colour, clip.colour),
                               ("motion", world.motion, clip.direction)):
        try:
            result[kind] = scorer(frames) == want
        except ValueError:
            result[kind] = False
    return result


def vqgan_ceiling(vqgan, truths, codes) -> dict[str, float]:
    """The generated-clip scores of the VQGAN's reconstructions of the true clips (their `codes`)."""
    matches = [generated_matches(vqgan.decode_codes(c), t) for c, t in zip(codes, truths)]
    return {kind: float(np.mean([m[kind] for m in matches])) for kind in ("colour", "motion")}


@functools.partial(jax.jit, static_argnames="config")
def _vision_logits(params, tokens, vision_mask, config):
    from model_zoo.model import hidden_states, vision_logits

    return vision_logits(params, hidden_states(params, tokens, config=config, vision_mask=vision_mask))


def next_code_accuracy(params, config, tokenizer, captions, codes, *, num_codes) -> list[float]:
    """Per frame, the fraction of codes that the model's most likely code (of the first `num_codes`, as
    generation draws them) gets right, each clip (int [F, n]) asked for by its caption
    (`generation_prompt`) with the true codes before it (teacher forcing)."""
    from model_zoo.generate import prompt_batch
    from model_zoo.vision_data import clip_tokens, generation_prompt

    rows, masks, starts = [], [], []
    for caption, clip in zip(captions, codes):
        prompt, clip_ids = generation_prompt(tokenizer, caption)[0], clip_tokens(clip)
        rows.append([*prompt.tolist(), *clip_ids.tolist()])
        masks.append([False] * len(prompt) + [True] * len(clip_ids))
        starts.append(len(prompt))
    tokens, _, vision = prompt_batch(rows, 0, config, vision_masks=masks)
    predicted = np.asarray(jnp.argmax(_vision_logits(params, tokens, vision, config)[..., :num_codes], axis=-1))
    frames, per_frame = np.shape(codes[0])
    right = np.zeros(frames)
    for i, start in enumerate(starts):
        for f in range(frames):
            at = start + f * (per_frame + 1) + np.arange(per_frame)  # each frame's codes, then <eof>
            right[f] += np.mean(predicted[i, at - 1] == tokens[i, at])
    return (right / len(starts)).tolist()


def evaluate_world(params, config, vqgan, tokenizer, truths, frames, *, batch=20, cfg_scale=DEFAULT_CFG_SCALE,
                   temperature=1.0, top_k=None, seed=0, generate=True) -> dict:
    """Scores on clips `frames` (uint8 [8, 64, 64, 3] each) whose contents are `truths` (world.Clip)."""
    frames = [np.asarray(f) for f in frames]
    codes = [vqgan.encode_frames(f) for f in frames]
    scores = {"clips": len(truths), "reconstruction": reconstruction_error(vqgan, np.concatenate(frames[:50]))}
    for kind, question in world.QUESTIONS.items():
        right = 0
        for start in range(0, len(truths), batch):
            part = slice(start, start + batch)
            answers = answer_about_clips(params, config, tokenizer, codes[part], [question] * len(codes[part]),
                                         max_new_tokens=6)
            right += sum(normalise_answer(a) == t.answer(kind) for a, t in zip(answers, truths[part]))
        scores[f"answer_{kind}"] = right / len(truths)
    if generate:
        matches = {"colour": 0, "motion": 0}
        for start in range(0, len(truths), batch):
            part = truths[start:start + batch]
            clips = clips_from_captions(params, config, tokenizer, [t.caption for t in part], frames=world.FRAMES,
                                        tokens_per_frame=vqgan.tokens_per_frame, num_codes=vqgan.num_codes,
                                        cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, seed=seed + start)
            for clip_codes, truth in zip(clips, part):
                for kind, ok in generated_matches(vqgan.decode_codes(clip_codes), truth).items():
                    matches[kind] += ok
        scores.update({f"generated_{k}": v / len(truths) for k, v in matches.items()})
        scores["generation"] = {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "seed": seed}
        scores["vqgan_ceiling"] = vqgan_ceiling(vqgan, truths, codes)
        parts = [slice(i, i + batch) for i in range(0, len(truths), batch)]
        accuracy = [next_code_accuracy(params, config, tokenizer, [t.caption for t in truths[part]], codes[part],
                                       num_codes=vqgan.num_codes) for part in parts]
        sizes = [len(truths[part]) for part in parts]
        scores["next_code_accuracy"] = np.average(accuracy, axis=0, weights=sizes).round(4).tolist()
    return scores
