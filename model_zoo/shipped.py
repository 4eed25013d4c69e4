"""Models that ship inside the package, usable by name (`--model lwm-tiny-retrieval`) right after
install, and how one is written: model.json (config), params.safetensors (float32, a few MB) and
provenance.json (the command that trained it, its steps and tokens, its needle score)."""

import json
import pathlib

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from model_zoo.config import LWMConfig

SHIPPED_DIR = pathlib.Path(__file__).parent / "assets" / "models"


def shipped_models() -> tuple[str, ...]:
    """Names of the models in the package."""
    if not SHIPPED_DIR.is_dir():
        return ()
    return tuple(sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "model.json").is_file()))


def resolve_model(name_or_path) -> pathlib.Path:
    """A model folder or training workdir given as a path, or a shipped model's name: its folder."""
    path = pathlib.Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path) in shipped_models():
        return SHIPPED_DIR / str(name_or_path)
    raise FileNotFoundError(
        f"--model {str(name_or_path)!r} is neither a folder nor a shipped model; shipped: {', '.join(shipped_models())}"
    )


def _flat(params):
    return {jax.tree_util.keystr(path, simple=True, separator="."): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def export_model(directory, config: LWMConfig, params, provenance: dict):
    """Writes a self-contained model folder: model.json, params.safetensors, provenance.json."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = _flat(jax.device_get(params))
    save_file(flat, directory / "params.safetensors")
    dtype = str(next(iter(flat.values())).dtype)
    (directory / "model.json").write_text(json.dumps({"config": config.to_dict(), "dtype": dtype}, indent=2) + "\n")
    (directory / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def read_safetensors_params(path, template):
    """Parameters from params.safetensors, in the tree of `template` (shapes checked)."""
    flat = load_file(pathlib.Path(path))
    expected = _flat(jax.tree.map(lambda s: np.zeros((), s.dtype), template))
    if set(flat) != set(expected):
        raise ValueError(f"{path} holds parameters {sorted(flat)}, the model expects {sorted(expected)}")
    leaves = []
    for (key_path, shape) in jax.tree_util.tree_leaves_with_path(template):
        key = jax.tree_util.keystr(key_path, simple=True, separator=".")
        if flat[key].shape != shape.shape:
            raise ValueError(f"{path}: {key} has shape {flat[key].shape}, the model expects {shape.shape}")
        leaves.append(flat[key])
    return jax.tree.unflatten(jax.tree.structure(template), leaves)
