"""Scores a vision model on the procedural world (`model_zoo.world`): the VQGAN's reconstruction
error, the answer accuracy per question kind, and, for clips generated from captions, whether the
dominant colour is the caption's and the shape moves the captioned way (read from the pixels)."""

import numpy as np

from model_zoo import world
from model_zoo.vision_generate import answer_about_clips, clips_from_captions
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


def evaluate_world(params, config, vqgan, tokenizer, truths, frames, *, batch=20, cfg_scale=3.0, temperature=1.0,
                   top_k=None, seed=0, generate=True) -> dict:
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
    return scores
