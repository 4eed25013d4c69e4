"""Training checkpoints with orbax: atomic saves, the last N kept, a damaged latest one skipped.

Each checkpoint holds the train state (parameters, optimizer state, step, PRNG key) and a JSON
record (stage, data seed, config, and a fingerprint of the state's bytes). Orbax writes to a
temporary folder and renames it when complete, so a save cut short is never listed; the
fingerprint catches a finished checkpoint whose files were damaged afterwards.
"""

import hashlib
import json
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from model_zoo.config import LWMConfig
from model_zoo.model import init_params
from model_zoo.sharding import param_shardings
from model_zoo.shipped import read_safetensors_params


class CheckpointError(RuntimeError):
    pass


def fingerprint(state) -> str:
    """sha256 over every leaf's bytes, in tree order. With several processes, each hashes the
    shards it holds (in index order) and the digests of all processes are hashed together: no
    process can read a leaf that is sharded over the others' devices."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if jax.process_count() == 1 or not isinstance(leaf, jax.Array):
            digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
            continue
        for shard in sorted(leaf.addressable_shards, key=lambda s: (str(s.index), s.device.id)):
            digest.update(np.ascontiguousarray(shard.data).tobytes())
    if jax.process_count() == 1:
        return digest.hexdigest()
    from jax.experimental import multihost_utils

    local = np.frombuffer(digest.digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(local))  # [processes, 32]
    return hashlib.sha256(every.tobytes()).hexdigest()


class Checkpoints:
    def __init__(self, directory, keep: int = 3):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, record: dict):
        record = dict(record, fingerprint=fingerprint(state))
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
        )
        self._manager.wait_until_finished()

    def restore_latest(self, template):
        """(step, state, record) of the newest readable checkpoint, or None when there is none.

        `template` is a state of the right structure, shapes and shardings. A checkpoint that does
        not load, or whose bytes do not match its fingerprint, is reported and the one before it tried.
        """
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)

        def restore(step):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore())
            )
            state, record = restored["state"], restored["record"]
            if record.get("fingerprint") != fingerprint(state):
                raise CheckpointError("its contents do not match the fingerprint saved with it")
            return step, state, record

        return self._newest_readable(restore)

    def restore_latest_params(self, mesh=None):
        """(config, params) of the newest readable checkpoint, the parameters alone (no optimizer
        state is read), placed by `param_shardings` over `mesh` or on the default device."""

        def restore(step):
            record = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
            config = LWMConfig.from_dict(record["model"])
            target = {"params": _abstract_params(config, mesh)}
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            state = self._manager.restore(
                step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
                ),
            )["state"]
            return config, state["params"]

        restored = self._newest_readable(restore)
        if restored is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return restored

    def _newest_readable(self, restore):
        """`restore(step)` of the newest step it succeeds on; each failure is reported and the step
        before tried. None when there are no checkpoints; an error when none is readable."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                return restore(step)
            except Exception as error:  # any failure to read means this checkpoint cannot be trusted
                print(f"checkpoint at step {step} in {self.directory} is damaged ({_brief(error)}); "
                      "trying the one before it", file=sys.stderr)
        if steps:
            raise CheckpointError(f"no readable checkpoint among steps {steps} in {self.directory}")
        return None

    def close(self):
        self._manager.close()


def _brief(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def save_model(directory, config, params):
    """Writes a model folder: model.json (config and parameter dtype) and an orbax checkpoint in params/."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params, force=True)
    dtype = str(jax.tree.leaves(params)[0].dtype)
    (directory / "model.json").write_text(json.dumps({"config": config.to_dict(), "dtype": dtype}, indent=2) + "\n")


def read_config(path) -> LWMConfig:
    """The config of a model folder or training workdir, without reading its parameters."""
    path = pathlib.Path(path)
    if (path / "model.json").is_file():
        return LWMConfig.from_dict(json.loads((path / "model.json").read_text())["config"])
    if (path / "run.json").is_file():
        return LWMConfig.from_dict(json.loads((path / "run.json").read_text())["model"])
    raise FileNotFoundError(f"{str(path)!r} is neither a model folder (model.json) nor a training workdir (run.json)")


def load_model(path, mesh=None):
    """(config, params) from a model folder (`save_model`, `python -m model_zoo convert`, or a
    shipped model's params.safetensors) or from a training workdir (the parameters of its newest
    readable checkpoint).

    `mesh`: the parameters are placed by `param_shardings` over it; None: on the default device.
    """
    path = pathlib.Path(path).absolute()
    if (path / "model.json").is_file():
        saved = json.loads((path / "model.json").read_text())
        config = LWMConfig.from_dict(saved["config"])
        target = _abstract_params(config, mesh, saved["dtype"])
        if (path / "params.safetensors").is_file():  # a shipped model (model_zoo.shipped)
            params = read_safetensors_params(path / "params.safetensors", target)
            return config, jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, target)
        with ocp.StandardCheckpointer() as checkpointer:
            return config, checkpointer.restore(path / "params", target)
    if (path / "checkpoints").is_dir():
        checkpoints = Checkpoints(path / "checkpoints")
        try:
            return checkpoints.restore_latest_params(mesh)
        finally:
            checkpoints.close()
    raise FileNotFoundError(
        f"{str(path)!r} is neither a model folder (model.json + params/) nor a training workdir (checkpoints/)"
    )


def parameter_placement(config, mesh=None, dtype="float32"):
    """(abstract parameters, where each goes): `param_shardings` over `mesh`, or the default device."""
    shapes = jax.eval_shape(lambda key: init_params(config, key, dtype=dtype), jax.random.key(0))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return shapes, jax.tree.map(lambda _: device, shapes)
    return shapes, param_shardings(shapes, mesh)


def _abstract_params(config, mesh, dtype="float32"):
    shapes, placed = parameter_placement(config, mesh, dtype)
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p), shapes, placed)
