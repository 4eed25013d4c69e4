"""Training: AdamW with warm-up and cosine decay, progressive context stages, resumable checkpoints.

`train(TrainConfig(...), workdir)` runs every stage in turn, each continuing from the last with a
longer sequence and a larger rotary theta. Running it again in the same workdir resumes from the
newest readable checkpoint and reproduces the uninterrupted run exactly: on the embedded corpus the
batch for a step is a function of the seed and the step; on the user's documents (`data`) each
checkpoint keeps the loader's position beside the model.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from model_zoo.checkpoint import Checkpoints, load_model
from model_zoo.config import LWMConfig, check_positive_ints
from model_zoo.data import check_long_needle_fraction, check_max_needles, check_row_fractions, packed_batch
from model_zoo.documents import Documents
from model_zoo.loader import DocumentBatches
from model_zoo.model import hidden_states, init_params, text_logits, vision_logits
from model_zoo.sharding import (
    BATCH,
    ZERO_AXES,
    batch_sharding,
    check_mesh_shapes,
    global_batch,
    make_mesh,
    param_shardings,
)
from model_zoo.shipped import resolve_model
from model_zoo.tokenizer import check_fits, copy_tokenizer, default_tokenizer, load_tokenizer, model_tokenizer
from model_zoo.vision_data import VisionSpec


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Stage:
    """One context stage: `steps` steps on rows of `seq_len` tokens with rotary `rope_theta`;
    `batch_size` rows per batch, or None for the run's."""

    seq_len: int
    rope_theta: float
    steps: int
    batch_size: int | None = None

    def __post_init__(self):
        check_positive_ints(self, "seq_len", "steps")
        if self.batch_size is not None:
            check_positive_ints(self, "batch_size")
        if not self.rope_theta > 1:
            raise ValueError(f"Stage.rope_theta must be > 1, got {self.rope_theta!r}")


# TINY from scratch (`--init-from none`): 512 tokens, then 2048 with theta raised.
TINY_STAGES = (Stage(512, 1e4, 250), Stage(2048, 1e5, 50))
# TINY's main job (`train --preset tiny` as it stands) extends a trained model's context as LWM
# extends LLaMA-2's: from the shipped 2048-token retrieval model, 40 steps of 4 x 4096 tokens at
# rope_theta 3e5, then 100 of 2 x 8192 at 1e6, every batch 16K tokens, half the rows needle
# questions so that retrieval carries over. A third of the peak rate the model was trained with
# from scratch (3e-3 forgets retrieval at 2K on some seeds), and half the needle rows one
# row-long document with its needle drawn towards the start, so that the longest distances,
# which packed documents rarely hold, are trained.
# TrainConfig fields; flags given beside it override them.
MAIN_JOB = dict(
    init_from="lwm-tiny-retrieval",
    stages=(Stage(4096, 3e5, 40, batch_size=4), Stage(8192, 1e6, 100, batch_size=2)),
    learning_rate=1e-3, long_needle_fraction=0.5,
)
# Named recipes for `train --recipe`: TrainConfig fields. "retrieval": the TINY model to needle
# retrieval up to 2048 tokens (half the rows needle questions, half repeated passages; the copy
# circuit forms at 256 tokens, then a 2048-token stage carries it to the full length).
RECIPES = {
    "retrieval": dict(
        stages=(Stage(256, 1e4, 3200, batch_size=16), Stage(2048, 1e5, 600, batch_size=4)),
        needle_fraction=0.5, repeat_fraction=0.5, learning_rate=3e-3, save_every=200,
    ),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: LWMConfig
    stages: tuple[Stage, ...] = TINY_STAGES
    batch_size: int = 8
    # With a value: each stage's rows are tokens_per_batch // seq_len, so that every batch holds the
    # same number of tokens, as LWM sizes its stages; batch_size is then unused.
    tokens_per_batch: int | None = None
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    needle_fraction: float = 0.5
    repeat_fraction: float = 0.0
    copy_fraction: float = 0.0
    max_needles: int = 1  # needles per training document, all asked for (1..max_needles)
    long_needle_fraction: float = 0.0  # needle rows holding one row-long document (see data.packed_batch)
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 3
    mesh: tuple = (("sp", -1),)  # mesh axis sizes, see model_zoo.sharding.make_mesh
    init_from: str | None = None  # a workdir, model folder or shipped model whose parameters start a fresh run
    # Parameters and optimizer state sharded over the sequence and data axes too (ZeRO-3 over every
    # device), not only fsdp/tp: what lets a 7B model's AdamW state fit beside a 1M-token context.
    params_over_sequence: bool = False
    # The user's documents (files or globs, model_zoo.documents) instead of the embedded corpus; the
    # row kinds above then draw their text from them.
    data: tuple[str, ...] = ()
    data_field: str = "text"
    # A SentencePiece .model or a tokenizer.json; None: init_from's own, else the shipped one.
    tokenizer: str | None = None
    # A vision model's VQGAN (a diffusers VQModel folder): encodes --data's image and video rows, and
    # is copied into the workdir (vqgan/) so that the model carries it.
    vqgan: str | None = None

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages must not be empty")
        check_positive_ints(self, "batch_size", "save_every", "keep_checkpoints")
        if self.tokens_per_batch is not None:
            check_positive_ints(self, "tokens_per_batch")
            short = [s.seq_len for s in self.stages if s.seq_len > self.tokens_per_batch]
            if short:
                raise ValueError(
                    f"tokens_per_batch={self.tokens_per_batch} holds no row of a stage of {short[0]} tokens"
                )
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        check_row_fractions(self.needle_fraction, self.repeat_fraction, self.copy_fraction)
        check_max_needles(self.max_needles)
        check_long_needle_fraction(self.long_needle_fraction)
        if isinstance(self.data, str) or not all(isinstance(d, str) for d in self.data):
            raise ValueError(f"data must be a tuple of file names or globs, got {self.data!r}")
        if self.vqgan is not None and not self.model.vision:
            raise ValueError("vqgan was given for a model without vision (LWMConfig vision=False)")
        longest = max(s.seq_len for s in self.stages)
        if longest > self.model.max_position_embeddings:
            raise ValueError(
                f"a stage has seq_len={longest}, beyond max_position_embeddings={self.model.max_position_embeddings}"
            )

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def rows(self, stage: Stage) -> int:
        """The batch size (rows) of `stage`: its own, else from tokens_per_batch, else the run's."""
        if stage.batch_size is not None:
            return stage.batch_size
        return self.batch_size if self.tokens_per_batch is None else self.tokens_per_batch // stage.seq_len

    def stage_model(self, stage: Stage) -> LWMConfig:
        """The model as `stage` trains it (its rope_theta): what its steps run and its checkpoints record."""
        return self.model.replace(rope_theta=stage.rope_theta)

    def stage_at(self, step: int) -> tuple[int, Stage]:
        end = 0
        for index, stage in enumerate(self.stages):
            end += stage.steps
            if step < end:
                return index, stage
        raise ValueError(f"step {step} is past the last stage (total {self.total_steps} steps)")


def loss_fn(params, batch, config: LWMConfig, attention=None):
    """Cross entropy normalised per row (each row's mean over its loss-masked tokens), averaged over
    rows that have any; with vision tokens, text and vision losses weigh 0.5 each when both appear.
    `attention` replaces ring attention, as in `hidden_states`."""
    x = hidden_states(
        params, batch["inputs"], config=config, segment_ids=batch["segment_ids"],
        positions=batch["positions"], vision_mask=batch.get("vision_inputs"), attention=attention,
    )
    mask = batch["loss_mask"]
    if not config.vision or "vision_targets" not in batch:  # text batches (the embedded corpus's, say)
        return row_normalised(cross_entropy(text_logits(params, x), batch["targets"]), mask)
    is_vision = batch["vision_targets"].astype(mask.dtype)
    text_targets = jnp.where(is_vision > 0, 0, batch["targets"])
    vision_targets = jnp.where(is_vision > 0, batch["targets"], 0)
    text = row_normalised(cross_entropy(text_logits(params, x), text_targets), mask * (1 - is_vision))
    vision = row_normalised(cross_entropy(vision_logits(params, x), vision_targets), mask * is_vision)
    has_text, has_vision = jnp.any(mask * (1 - is_vision) > 0), jnp.any(mask * is_vision > 0)
    both = has_text & has_vision
    return jnp.where(both, 0.5 * text + 0.5 * vision, jnp.where(has_vision, vision, text))


def cross_entropy(logits, targets):
    """Per-token cross entropy [B, L] of `targets` under `logits` [B, L, V]."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def row_normalised(losses, mask):
    per_row = jnp.sum(losses * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    rows = jnp.sum(jnp.any(mask > 0, axis=1))
    return jnp.sum(per_row) / jnp.maximum(rows, 1)


def make_optimizer(cfg: TrainConfig):
    warmup = min(cfg.warmup_steps, cfg.total_steps // 2)  # a short run still decays
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, max(cfg.total_steps, warmup + 1), end_value=0.1 * cfg.learning_rate
    )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train_step(tx, model_config, state_shardings=None):
    """The jitted step `(state, batch) -> (state, {"loss", "grad_norm"})` that training runs and
    `plan` compiles for other chips; with `state_shardings`, the new state is pinned there."""

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, model_config)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                         step=state["step"] + 1)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None))  # the state stays where it lies


def optimizer_state_shardings(tx, params):
    """Where each leaf of `tx.init(params)` lives (params: arrays or ShapeDtypeStructs, placed):
    a moment as the parameter it mirrors (the parameter tree again under the state's own path),
    anything else (counters) replicated. Left to XLA, the moments come out replicated."""
    flat = {tuple(path): p for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}
    some = next(iter(flat.values())).sharding
    replicated = NamedSharding(some.mesh, P()) if isinstance(some, NamedSharding) else some

    def where(path, leaf):
        for start in range(len(path)):
            param = flat.get(tuple(path[start:]))
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(where, jax.eval_shape(tx.init, params))


def init_optimizer(tx, params):
    """`tx.init(params)` with each moment sharded as its parameter."""
    return jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, params))(params)


def initial_state(cfg: TrainConfig, mesh):
    key = jax.random.key(cfg.seed)
    init = functools.partial(init_params, cfg.model)
    extra_axes = ZERO_AXES if cfg.params_over_sequence else ()
    params = jax.jit(init, out_shardings=param_shardings(jax.eval_shape(init, key), mesh, extra_axes))(key)
    opt_state = init_optimizer(make_optimizer(cfg), params)
    return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32), "rng": key}


def training_mesh(cfg: TrainConfig):
    """The mesh `cfg.mesh` names, checked against the batch and every stage's length before any
    step runs (a stage that does not split over the ring would otherwise fail midway)."""
    mesh = make_mesh(**dict(cfg.mesh))
    for index, stage in enumerate(cfg.stages, 1):
        try:
            check_mesh_shapes(cfg.stage_model(stage), dict(mesh.shape), cfg.rows(stage), stage.seq_len)
        except ValueError as error:
            where = f"stage {index} ({stage.seq_len} tokens) on the mesh {dict(mesh.shape)}"
            raise ValueError(f"{where}: {error}") from None
    return mesh


def train(cfg: TrainConfig, workdir, *, progress=True, batches=None) -> dict:
    """Runs (or resumes) training in `workdir`; returns the final state. Writes checkpoints/,
    metrics.jsonl (one JSON object per step) and loss.png there. `batches`: the run's
    `training_batches`, when the caller has built them already (to check the data first)."""
    mesh = training_mesh(cfg)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    # With several processes the first writes the files; every process writes its checkpoint shards.
    primary = jax.process_index() == 0
    metrics_path = workdir / "metrics.jsonl" if primary else pathlib.Path(os.devnull)
    batches = batches or training_batches(cfg, mesh, training_tokenizer(cfg), training_vqgan(cfg))
    if primary:
        copy_tokenizer(batches.tokenizer, workdir)  # generate and eval read the model's tokenizer from its folder
        if cfg.vqgan is not None:
            shutil.copytree(cfg.vqgan, workdir / "vqgan", dirs_exist_ok=True)
    with jax.set_mesh(mesh):
        state = initial_state(cfg, mesh)
        restored = checkpoints.restore_latest(state)
        start = 0
        if restored is not None:
            start, state, record = restored
            if batches.documents is not None:
                batches.restore(record)
            print(f"resuming from the checkpoint at step {start} in {checkpoints.directory}")
        elif cfg.init_from is not None:
            params = _initial_params(cfg, mesh, state["params"])
            # placed where this run keeps its parameters (over the sequence too, if it asks)
            state = dict(state, params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, state["params"])))
            state["opt_state"] = init_optimizer(make_optimizer(cfg), state["params"])
            print(f"starting from the parameters in {cfg.init_from}")
        if primary:
            _keep_metrics_before(metrics_path, start)
        state = _run(cfg, mesh, state, start, checkpoints, metrics_path, progress and primary, batches)
    checkpoints.close()
    if primary:
        plot_losses(metrics_path, workdir / "loss.png", cfg)
    return state


def training_vqgan(cfg: TrainConfig):
    """The run's VQGAN (`cfg.vqgan`), or None."""
    if cfg.vqgan is None:
        return None
    from model_zoo.vqgan import VQGAN

    return VQGAN.load(cfg.vqgan)


def training_tokenizer(cfg: TrainConfig):
    """`cfg.tokenizer`, else the one `cfg.init_from` carries, else the shipped one; refused when
    its ids reach past the model's vocabulary."""
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif cfg.init_from is not None:
        tokenizer = model_tokenizer(resolve_model(cfg.init_from))
    else:
        tokenizer = default_tokenizer()
    check_fits(tokenizer, cfg.model.vocab_size)
    return tokenizer


class TrainingBatches:
    """The batch of each step, on the host: from the embedded corpus (a function of seed and step)
    or from the user's documents (`model_zoo.loader`, read in step order, its state checkpointed).
    Each process builds the rows of the data shards its devices hold."""

    def __init__(self, cfg: TrainConfig, mesh, tokenizer, documents=None):
        self.cfg, self.mesh, self.tokenizer, self.documents = cfg, mesh, tokenizer, documents
        vision = getattr(documents, "vision", None)  # the documents' VisionSpec, in a run with vision
        self.sharding = batch_sharding(mesh)
        self.num_shards = math.prod(mesh.shape[axis] for axis in BATCH)  # the data-parallel ranks
        self.loader = None
        if documents is not None:
            self.loader = DocumentBatches(
                documents, tokenizer, seed=cfg.seed, num_shards=self.num_shards, shards=self._local_shards(),
                needle_fraction=cfg.needle_fraction, repeat_fraction=cfg.repeat_fraction,
                copy_fraction=cfg.copy_fraction, max_needles=cfg.max_needles,
                long_needle_fraction=cfg.long_needle_fraction, vision=vision,
            )

    def _local_shards(self):
        """The data shards whose rows sit on this process's devices (with rows = shards, one each)."""
        rows = self.num_shards
        indices = self.sharding.addressable_devices_indices_map((rows, self.mesh.devices.size)).values()
        return sorted({i for index in indices for i in range(rows)[index[0]]})

    def host_batch(self, step, stage):
        rows = self.cfg.rows(stage)
        if self.loader is None:
            return packed_batch(
                self.cfg.seed, step, batch_size=rows, seq_len=stage.seq_len,
                needle_fraction=self.cfg.needle_fraction, repeat_fraction=self.cfg.repeat_fraction,
                copy_fraction=self.cfg.copy_fraction, max_needles=self.cfg.max_needles,
                long_needle_fraction=self.cfg.long_needle_fraction, tokenizer=self.tokenizer,
            )
        return self.loader.batch(step, rows, stage.seq_len)

    def device_batch(self, host_batch):
        return global_batch(host_batch, self.sharding)

    def check_enough(self, stage):
        if self.loader is not None:
            self.loader.check_enough(self.cfg.rows(stage), stage.seq_len)

    def state(self):
        """The loader's position in every data shard (gathered from the processes that read them), or None."""
        if self.loader is None:
            return None
        state = self.loader.state
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            local = np.full((self.num_shards, 2), -1, np.int64)
            for shard, position in state.items():
                local[int(shard)] = position
            gathered = np.asarray(multihost_utils.process_allgather(local)).max(axis=0)
            state = {str(d): [int(x) for x in gathered[d]] for d in range(self.num_shards)}
        return state

    def checkpoint_record(self) -> dict:
        """The loader's position, and what it read: the files and the data shards."""
        if self.loader is None:
            return {}
        return {"data_state": self.state(), "data": dict(self.documents.identity(), shards=self.num_shards)}

    def restore(self, record):
        """Continues where the checkpoint's loader stopped, if it read the same documents."""
        saved, now = record.get("data"), dict(self.documents.identity(), shards=self.num_shards)
        if saved != now:
            saved = saved or {}

            def difference(key):
                if key != "files":
                    return f"{key} ({saved.get(key)} then, {now[key]} now)"
                before, after = ({f[0]: f for f in files} for files in (saved.get("files", []), now["files"]))
                names = sorted(pathlib.Path(p).name for p in before.keys() | after.keys()
                               if before.get(p) != after.get(p))
                return f"files ({', '.join(names)})"

            changed = [difference(k) for k in now if saved.get(k) != now[k]]
            raise ValueError(
                f"the checkpoint's loader read other data than --data names now: {'; '.join(changed)} differ "
                "(files: their paths, sizes and modification times). Resuming would not continue its batches: "
                "restore the files as they were, or start a new --workdir"
            )
        self.loader.restore(record["data_state"])


def training_batches(cfg: TrainConfig, mesh, tokenizer, encoder=None) -> TrainingBatches:
    """The run's batches; the user's documents are opened (and every record checked) here, and
    refused if they cannot fill a batch of every stage, before any step. A vision model
    (`cfg.model.vision`) reads vision rows too (`model_zoo.vision_data`), their files encoded by
    `encoder` (the VQGAN; None: rows must give codes)."""
    documents = None
    if cfg.data:
        vision = VisionSpec(encoder=encoder) if cfg.model.vision else None
        documents = Documents(cfg.data, cfg.data_field, vision=vision)
        print(f"data: {documents.describe()}")
    batches = TrainingBatches(cfg, mesh, tokenizer, documents)
    if batches.loader is not None and batches.num_shards > 1:
        print(f"data: {batches.num_shards} shards (dp x fsdp); process {jax.process_index()} reads "
            f"{', '.join(map(str, batches.loader.shards))}")
    for stage in cfg.stages:
        batches.check_enough(stage)
    return batches


def _initial_params(cfg, mesh, template):
    """The parameters of `cfg.init_from`, as LWM starts each context stage from the one before it.
    Only their shapes must match the model's (rope_theta and the context length may differ)."""
    _, params = load_model(resolve_model(cfg.init_from), mesh=mesh)
    shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)), params)
    expected = jax.tree.map(lambda x: (x.shape, str(x.dtype)), template)
    if shapes != expected:
        raise ValueError(f"init_from={cfg.init_from!r} holds parameters of other shapes than the model {cfg.model}")
    return params


def _run(cfg, mesh, state, start, checkpoints, metrics_path, progress, batches):
    tx = make_optimizer(cfg)
    steps_by_stage = {}
    bar = tqdm(total=cfg.total_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    last_saved = start if start else None
    with open(metrics_path, "a") as metrics:
        for step in range(start, cfg.total_steps):
            index, stage = cfg.stage_at(step)
            if index not in steps_by_stage:
                shardings = jax.tree.map(lambda x: x.sharding, state) if cfg.params_over_sequence else None
                steps_by_stage[index] = train_step(tx, cfg.stage_model(stage), shardings)
                bar.set_description(f"stage {index + 1}/{len(cfg.stages)}: {stage.seq_len} tokens")
            host_batch = batches.host_batch(step, stage)
            batch = batches.device_batch(host_batch)
            tokens = int(_host_scalar(_count_tokens(batch["segment_ids"])))  # over every process's rows
            began = time.perf_counter()
            state, out = steps_by_stage[index](state, batch)
            loss, grad_norm = _host_scalar(out["loss"]), _host_scalar(out["grad_norm"])
            seconds = time.perf_counter() - began
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingError(
                    f"step {step} (stage {index + 1}, {stage.seq_len} tokens): loss is {loss} and the gradient "
                    f"norm {grad_norm}; stopping. Lower learning_rate (now {cfg.learning_rate}) and rerun: it "
                    f"resumes from the last checkpoint (step {last_saved})."
                )
            record = {"step": step, "loss": loss, "grad_norm": grad_norm, "stage": index, "seq_len": stage.seq_len,
                      "tokens": tokens, "seconds": seconds}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:,.0f}")
            bar.update()
            done = step + 1
            if done % cfg.save_every == 0 or done == cfg.total_steps or done == _stage_end(cfg, index):
                record = {"stage": index, "data_seed": cfg.seed, "model": cfg.stage_model(stage).to_dict(),
                          **batches.checkpoint_record()}
                checkpoints.save(done, state, record)
                last_saved = done
    bar.close()
    return state


@jax.jit
def _count_tokens(segment_ids):
    return jnp.count_nonzero(segment_ids)


def _host_scalar(x) -> float:
    """A replicated scalar's value; with several processes the array is not wholly addressable."""
    return float(np.asarray(x.addressable_data(0)))


def _stage_end(cfg, index):
    return sum(s.steps for s in cfg.stages[: index + 1])


def _keep_metrics_before(path: pathlib.Path, step: int):
    """Drops metric lines from steps at or after `step` (they are about to be rerun) and any torn line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", step) < step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path, png_path, cfg: TrainConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
    end = 0
    for stage in cfg.stages[:-1]:
        end += stage.steps
        ax.axvline(end, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="step", ylabel="loss (per-row normalised cross entropy)",
           title="training loss; dashed: context stage change")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
