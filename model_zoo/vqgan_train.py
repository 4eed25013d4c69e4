"""Training a VQGAN on frames: reconstruction, codebook and commitment losses with straight-through
gradients (VQ-VAE's objective), and codes nobody uses restarted on the batch's latents.

The first `autoencoder_steps` train the encoder and decoder without the quantiser; the codebook
then starts from k-means over the latents of fresh frames. Started from random codes, most latents
fall on a few codes and little passes the bottleneck for hundreds of steps.

LWM trains its VQGAN with perceptual and adversarial losses as well; on the procedural world
(`model_zoo.world`: flat colours on black) the pixel losses are enough, and keep a CPU run short.
A run saves its state every `save_every` steps and resumes from it; the model is written as a
diffusers `VQModel` folder (`model_zoo.vqgan.save_diffusers`).
"""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model_zoo import world
from model_zoo.vqgan import VQGANConfig, decode_latents, encode_latents, init_params, nearest_codes, save_diffusers

# The world's VQGAN: LWM's architecture at 64 x 64, a frame becoming 8 x 8 codes.
WORLD_VQGAN = VQGANConfig(resolution=64, hidden_channels=16, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
                          z_channels=32, num_codes=512, code_dim=16, norm_groups=8)


@dataclasses.dataclass(frozen=True)
class VQGANTraining:
    config: VQGANConfig = WORLD_VQGAN
    steps: int = 5000
    autoencoder_steps: int = 1000
    batch_frames: int = 16
    learning_rate: float = 1e-3
    commitment: float = 0.25
    shape_weight: float = 4.0  # extra weight of the pixels that are not background
    restart_every: int = 100  # steps between restarts of unused codes
    save_every: int = 250
    seed: int = 0


def losses(params, frames, config: VQGANConfig, commitment: float, quantize: bool = True, shape_weight: float = 0.0):
    """(total loss, (reconstruction MSE, codes)) of float frames [N, R, R, 3] in [-1, 1]; without
    `quantize`, the decoder reads the latents themselves."""
    latents = encode_latents(params, frames, config)
    codes = nearest_codes(params, latents)
    chosen = params["quantize.embedding.weight"][codes]
    codebook = jnp.mean(jnp.square(chosen - jax.lax.stop_gradient(latents)))
    commit = jnp.mean(jnp.square(latents - jax.lax.stop_gradient(chosen)))
    straight_through = latents + jax.lax.stop_gradient(chosen - latents)
    if not quantize:
        straight_through, codebook, commit = latents, 0.0, 0.0
    out = decode_latents(params, straight_through, config)
    mse = jnp.mean(jnp.square(out - frames))
    # Pixels off the background weigh more: a frame is mostly black, and an error in the shape's
    # colour (red decoded as olive) is what matters downstream.
    weight = 1 + shape_weight * (jnp.max(frames, axis=-1, keepdims=True) > -1)
    total = jnp.mean(weight * (jnp.square(out - frames) + jnp.abs(out - frames))) + codebook + commitment * commit
    return total, (mse, codes)


def world_frames(rng: np.random.Generator, n: int) -> np.ndarray:
    """n frames drawn from random clips of the world, float in [-1, 1]."""
    clips = [world.render(world.random_clip(rng)) for _ in range(-(-n // world.FRAMES))]
    frames = np.concatenate(clips)[rng.permutation(len(clips) * world.FRAMES)[:n]]
    return frames.astype(np.float32) / 127.5 - 1


def _kmeans_codebook(params, latents_of, frames_fn, run: VQGANTraining, iterations: int = 10):
    """The codebook as k-means centres of the latents of fresh frames (k-means++ seeding)."""
    rng = np.random.default_rng([run.seed, 2**31 + 1])
    latents = np.concatenate([np.asarray(latents_of(params, jnp.asarray(frames_fn(rng, run.batch_frames))))
                              for _ in range(8)]).reshape(-1, run.config.code_dim)
    k = run.config.num_codes
    centres = [latents[rng.integers(len(latents))]]
    nearest = np.square(latents - centres[0]).sum(-1)
    for _ in range(k - 1):
        centres.append(latents[rng.choice(len(latents), p=nearest / nearest.sum())])
        nearest = np.minimum(nearest, np.square(latents - centres[-1]).sum(-1))
    centres = np.stack(centres)
    for _ in range(iterations):
        assign = np.argmin(np.square(latents[:, None] - centres[None]).sum(-1), axis=1)
        for j in np.unique(assign):
            centres[j] = latents[assign == j].mean(0)
    return {**params, "quantize.embedding.weight": jnp.asarray(centres, jnp.float32)}


def _restart_unused(params, latents, counts, key):
    """Codes no frame chose since the last restart take latents drawn from the batch (a standard fix
    for codebook collapse: a code far from every latent never gets a gradient)."""
    codebook = params["quantize.embedding.weight"]
    flat = latents.reshape(-1, latents.shape[-1])
    picks = flat[jax.random.randint(key, (codebook.shape[0],), 0, flat.shape[0])]
    unused = counts == 0
    return {**params, "quantize.embedding.weight": jnp.where(unused[:, None], picks, codebook)}, int(unused.sum())


def train_vqgan(run: VQGANTraining, workdir, *, progress=True, frames_fn=world_frames) -> dict:
    """Trains (or resumes) in `workdir`; writes `workdir/vqgan` (diffusers format) and metrics.jsonl.
    Returns the last metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = run.config
    tx = optax.adam(run.learning_rate)
    params = init_params(config, jax.random.key(run.seed))
    state = {"params": params, "opt": tx.init(params), "counts": jnp.zeros(config.num_codes, jnp.int32)}
    start = 0
    saved = workdir / "state.npz"
    if saved.exists():
        state, start = _load_state(saved, state)
        print(f"resuming the VQGAN at step {start}")
    with open(workdir / "runs.jsonl", "a") as runs:  # every start and resume with its settings: the provenance
        runs.write(json.dumps({"from_step": start, **dataclasses.asdict(run)}) + "\n")

    @functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
    def step(state, frames, quantize):
        (loss, (mse, codes)), grads = jax.value_and_grad(losses, has_aux=True)(
            state["params"], frames, config, run.commitment, quantize, run.shape_weight)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        counts = state["counts"] + jnp.bincount(codes.reshape(-1), length=config.num_codes)
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "counts": counts}, loss, mse

    latents_of = jax.jit(functools.partial(encode_latents, config=config))
    held_out = jnp.asarray(frames_fn(np.random.default_rng([run.seed, 2**31]), 64))  # never trained on
    held_out_mse = jax.jit(lambda params, quantize: losses(params, held_out, config, run.commitment, quantize)[1][0],
                           static_argnums=1)
    bar = range(start, run.steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, initial=start, total=run.steps, desc="vqgan", unit="step")
    metrics = {}
    with open(workdir / "metrics.jsonl", "a") as log:
        for i in bar:
            frames = jnp.asarray(frames_fn(np.random.default_rng([run.seed, i]), run.batch_frames))
            quantize = i >= run.autoencoder_steps
            if i == run.autoencoder_steps:
                state = {**state, "params": _kmeans_codebook(state["params"], latents_of, frames_fn, run)}
            state, loss, mse = step(state, frames, quantize)
            if not quantize and (i + 1) % run.restart_every == 0:
                metrics = {"step": i + 1, "loss": float(loss), "mse": float(mse),
                           "held_out_mse": float(held_out_mse(state["params"], False)), "quantized": False}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            elif (i + 1) % run.restart_every == 0 and i + 1 < run.steps:
                params, restarted = _restart_unused(state["params"], latents_of(state["params"], frames),
                                                    state["counts"], jax.random.key(i))
                state = {**state, "params": params, "counts": jnp.zeros_like(state["counts"])}
                metrics = {"step": i + 1, "loss": float(loss), "mse": float(mse),
                           "held_out_mse": float(held_out_mse(state["params"], True)), "restarted": restarted}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if progress:
                    bar.set_postfix(held_out_mse=f"{metrics['held_out_mse']:.4f}", restarted=restarted)
            if (i + 1) % run.save_every == 0 or i + 1 == run.steps:
                _save_state(saved, state, i + 1)
    save_diffusers(workdir / "vqgan", config, jax.device_get(state["params"]))
    return metrics


def _save_state(path: pathlib.Path, state, step: int):
    leaves = {f"{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(jax.device_get(state)))}
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, step=step, **leaves)
    partial.replace(path)  # whole or absent: a run stopped mid-save resumes from the one before


def _load_state(path: pathlib.Path, template):
    with np.load(path) as data:
        leaves = [jnp.asarray(data[f"{i}"]) for i in range(len(jax.tree.leaves(template)))]
        return jax.tree.unflatten(jax.tree.structure(template), leaves), int(data["step"])


def reconstruction_error(vqgan, frames: np.ndarray) -> dict:
    """Mean absolute and squared error (on 0..255) of uint8 frames encoded and decoded, and how
    many distinct codes they used."""
    codes = vqgan.encode_frames(frames)
    back = vqgan.decode_codes(codes).astype(np.float32)
    diff = back - frames.astype(np.float32)
    return {"mae": float(np.abs(diff).mean()), "rmse": float(np.sqrt(np.square(diff).mean())),
            "codes_used": int(len(np.unique(codes)))}
