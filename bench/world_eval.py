"""Scores a vision model on fresh clips of the procedural world drawn by PIL (`reference.world`,
not the renderer the model was trained on): answer accuracy per question kind, and for clips it
generates from their captions whether the dominant colour and the motion match (read from the
pixels by `model_zoo.world`'s scorers). Writes bench/results/world.json and a grid of generated
clips (bench/results/world_generated.gif) with their captions (world_generated.md).

    python bench/world_eval.py --model lwm-tiny-vision --clips 200
    python bench/world_eval.py --clips 100 --seed 777 --cfg-scale 3 --out /tmp/cfg3   # a sampling setting, held out
"""

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `reference` from the checkout

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from model_zoo import world  # noqa: E402
from model_zoo.checkpoint import load_model  # noqa: E402
from model_zoo.media import write_frames  # noqa: E402
from model_zoo.sharding import make_mesh  # noqa: E402
from model_zoo.shipped import resolve_model  # noqa: E402
from model_zoo.tokenizer import model_tokenizer  # noqa: E402
from model_zoo.vision_generate import DEFAULT_CFG_SCALE, clips_from_captions  # noqa: E402
from model_zoo.vqgan import VQGAN  # noqa: E402
from model_zoo.world_eval import evaluate_world  # noqa: E402
from reference.world import draw_truth, pil_clip  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def pil_clips(seed: int, n: int):
    """(truths as world.Clip, frames) of n clips PIL draws."""
    rng = np.random.default_rng(seed)
    truths, frames = [], []
    for _ in range(n):
        colour, shape, direction, size, left, top = draw_truth(rng)
        truths.append(world.Clip(colour, shape, direction, size, left + size / 2, top + size / 2))
        frames.append(pil_clip(colour, shape, direction, size, left, top))
    return truths, frames


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lwm-tiny-vision")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG_SCALE)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--grid", type=int, default=8, help="generated clips shown in the README's grid")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)

    folder = resolve_model(args.model)
    mesh = make_mesh(sp=8)
    config, params = load_model(folder, mesh=mesh)
    vqgan, tokenizer = VQGAN.load(folder / "vqgan"), model_tokenizer(folder)
    truths, frames = pil_clips(args.seed, args.clips)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        scores = evaluate_world(params, config, vqgan, tokenizer, truths, frames, cfg_scale=args.cfg_scale,
                                temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        shown = truths[: args.grid]
        codes = clips_from_captions(params, config, tokenizer, [t.caption for t in shown], frames=world.FRAMES,
                                    tokens_per_frame=vqgan.tokens_per_frame, num_codes=vqgan.num_codes,
                                    cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                                    seed=args.seed + 1)
    scores.update(model=str(args.model), renderer="reference.world (PIL)", seed=args.seed,
                  seconds=round(time.perf_counter() - start, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "world.json").write_text(json.dumps(scores, indent=2) + "\n")
    generated = [vqgan.decode_codes(c) for c in codes]
    grid = np.concatenate([np.pad(g, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=64) for g in generated], axis=2)
    write_frames(args.out / "world_generated.gif", grid, fps=4)
    captions = " | ".join(t.caption for t in shown)
    (args.out / "world_generated.md").write_text(f"Left to right: {captions}\n")
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
