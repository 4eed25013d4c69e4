"""The tiny world, trained end to end: a VQGAN on the world's frames, then TINY with vision on
caption -> clip and clip -> question/answer rows over the ring, then scored and exported.

`python -m model_zoo world --workdir W` runs the steps below; each leaves its result in W and a
rerun skips what is done and resumes what was stopped (the VQGAN and LWM both checkpoint):

1. `W/vqgan-run`: the VQGAN (`model_zoo.vqgan_train`, `WORLD_VQGAN`: a 64 x 64 frame -> 8 x 8 codes).
2. Rounds of LWM training, each on clips drawn fresh for it (rendering is cheap, so a round sees
   new clips where more epochs would repeat old ones); round 1 starts from random parameters,
   each later round from the round before it, with its own warm-up and cosine decay:
   a. `W/data/rows.jsonl` (round k > 1: `rows-k.jsonl`): clips of `model_zoo.world`, encoded; per
      clip a generation row (caption -> clip; one in ten without its caption, `<s><vision>` ->
      clip, the unconditional row that classifier-free guidance asks) and one understanding row
      (a question of a kind drawn at random, its one-word answer).
   b. `W/lwm` (round k > 1: `W/lwm-k`): TINY with vision on those rows (`model_zoo.train`), on the
      ring of all devices.
3. `W/model`: the last round's model folder (model.json, params.safetensors, the tokenizer, the
   VQGAN in `vqgan/`, provenance.json with the scores of `model_zoo.world_eval` on fresh clips).
"""

import dataclasses
import json
import pathlib
import shutil

import numpy as np

from model_zoo import world
from model_zoo.config import TINY
from model_zoo.vqgan import VQGAN
from model_zoo.vqgan_train import VQGANTraining, train_vqgan

WORLD_MODEL = TINY.replace(vision=True)
UNCONDITIONAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class WorldRecipe:
    vqgan_steps: int = 5000  # the first fifth without the quantiser (model_zoo.vqgan_train)
    clips: int = 4000
    steps: int = 3000  # a round
    rounds: int = 3
    rows: int = 4
    seq_len: int = 1200  # two clips' rows (about 585 tokens each) a row
    learning_rate: float = 2e-3  # round 1's peak
    later_learning_rate: float = 1e-3  # later rounds' peak: they start from trained parameters
    eval_clips: int = 60
    seed: int = 0


def world_rows(vqgan: VQGAN, clips: int, seed: int, *, training_round: int = 1, batch: int = 64) -> list[dict]:
    """Training rows (JSON-ready) of `clips` fresh clips for training round `training_round`, encoded by `vqgan`."""
    rng = np.random.default_rng([seed, 1] if training_round == 1 else [seed, 1, training_round])
    rows = []
    for start in range(0, clips, batch):
        drawn = [world.random_clip(rng) for _ in range(min(batch, clips - start))]
        frames = np.concatenate([world.render(c) for c in drawn])
        codes = vqgan.encode_frames(frames).reshape(len(drawn), world.FRAMES, -1)
        for clip, clip_codes in zip(drawn, codes):
            vision = clip_codes.tolist()
            if rng.random() < UNCONDITIONAL_FRACTION:
                rows.append({"vision": vision, "fields": "vision"})
            else:
                rows.append({"vision": vision, "caption": clip.caption})
            kind = str(rng.choice(list(world.QUESTIONS)))
            rows.append({"vision": vision, "question": world.QUESTIONS[kind], "answer": clip.answer(kind)})
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def run_world_recipe(recipe: WorldRecipe, workdir, *, progress=True, command=None) -> pathlib.Path:
    """Runs (or resumes) the recipe in `workdir`; returns the model folder."""
    from model_zoo.train import Stage, TrainConfig, train

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if command:
        with open(workdir / "commands.log", "a") as log:
            log.write(command + "\n")
    vqgan_dir = workdir / "vqgan-run"
    if not (vqgan_dir / "vqgan" / "config.json").is_file():
        run = VQGANTraining(steps=recipe.vqgan_steps, autoencoder_steps=recipe.vqgan_steps // 5, seed=recipe.seed,
                            restart_every=min(100, max(1, recipe.vqgan_steps // 6)))
        train_vqgan(run, vqgan_dir, progress=progress)
    vqgan = VQGAN.load(vqgan_dir / "vqgan")
    for k in range(1, recipe.rounds + 1):
        rows_path = _round_rows(workdir, k)
        if not rows_path.is_file():
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            partial = rows_path.with_suffix(".partial")
            with open(partial, "w") as out:
                for row in world_rows(vqgan, recipe.clips, recipe.seed, training_round=k):
                    out.write(json.dumps(row) + "\n")
            partial.replace(rows_path)
        cfg = TrainConfig(
            model=WORLD_MODEL, stages=(Stage(recipe.seq_len, WORLD_MODEL.rope_theta, recipe.steps, recipe.rows),),
            learning_rate=recipe.learning_rate if k == 1 else recipe.later_learning_rate, needle_fraction=0.0,
            data=(str(rows_path),), seed=recipe.seed + k - 1, save_every=100, vqgan=str(vqgan_dir / "vqgan"),
            init_from=None if k == 1 else str(_round_dir(workdir, k - 1)),
        )
        if progress and recipe.rounds > 1:
            print(f"round {k} of {recipe.rounds}")
        train(cfg, _round_dir(workdir, k), progress=progress)
    return export_world_model(workdir, recipe)


def _round_rows(workdir: pathlib.Path, k: int) -> pathlib.Path:
    return workdir / "data" / ("rows.jsonl" if k == 1 else f"rows-{k}.jsonl")


def _round_dir(workdir: pathlib.Path, k: int) -> pathlib.Path:
    return workdir / ("lwm" if k == 1 else f"lwm-{k}")


def export_world_model(workdir, recipe: WorldRecipe) -> pathlib.Path:
    """W/model: the trained LWM with its VQGAN and tokenizer, scored on fresh clips (provenance.json)."""
    import jax

    from model_zoo.checkpoint import load_model
    from model_zoo.shipped import export_model
    from model_zoo.tokenizer import copy_tokenizer, model_tokenizer
    from model_zoo.train import read_metrics
    from model_zoo.world_eval import evaluate_world

    workdir = pathlib.Path(workdir)
    out = workdir / "model"
    last = _round_dir(workdir, recipe.rounds)
    config, params = load_model(last)
    vqgan = VQGAN.load(workdir / "vqgan-run" / "vqgan")
    tokenizer = model_tokenizer(last)
    rng = np.random.default_rng([recipe.seed, 2])
    clips = [world.random_clip(rng) for _ in range(recipe.eval_clips)]
    scores = evaluate_world(params, config, vqgan, tokenizer, clips, [world.render(c) for c in clips])
    rounds = [read_metrics(_round_dir(workdir, k) / "metrics.jsonl") for k in range(1, recipe.rounds + 1)]
    metrics = [r for round_metrics in rounds for r in round_metrics]
    vq_metrics = [json.loads(line) for line in open(workdir / "vqgan-run" / "metrics.jsonl")]
    vq_runs = [json.loads(line) for line in open(workdir / "vqgan-run" / "runs.jsonl")]
    provenance = {
        "commands": (workdir / "commands.log").read_text().splitlines() if (workdir / "commands.log").exists()
        else [],
        "recipe": dataclasses.asdict(recipe),
        "vqgan": {"runs": vq_runs, "last": vq_metrics[-1] if vq_metrics else None},
        "steps": len(metrics),
        "tokens": sum(r["tokens"] for r in metrics),
        "step_seconds": round(sum(r["seconds"] for r in metrics), 1),
        "rounds": [{"steps": len(m), "final_loss": round(float(np.mean([r["loss"] for r in m[-50:]])), 4)}
                   for m in rounds],
        "world_eval": scores,
        "jax": jax.__version__,
    }
    export_model(out, config, params, provenance)
    copy_tokenizer(tokenizer, out)
    shutil.copytree(workdir / "vqgan-run" / "vqgan", out / "vqgan", dirs_exist_ok=True)
    return out
