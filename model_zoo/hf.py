"""Hugging Face LLaMA checkpoints (config.json + safetensors) into this model's config and parameters.

LWM-Text-Chat-1M and its relatives are published this way. A tensor is read, transposed and cast
into its destination one at a time, and each parameter is placed on its devices as soon as all its
layers are in, so memory peaks at about one copy of the model.
"""

import json
import pathlib
import re
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from model_zoo.checkpoint import parameter_placement, save_model
from model_zoo.config import LWMConfig
from model_zoo.tokenizer import check_fits, copy_tokenizer, folder_tokenizer

# Hugging Face name inside a layer -> our stacked parameter. Linear weights are [out, in] there and
# [in, out] here; the norms are vectors.
_LAYER_PARAMS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "w_gate",
    "mlp.up_proj": "w_up",
    "mlp.down_proj": "w_down",
}
_TOP_PARAMS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
_VECTORS_AND_EMBED = ("embed", "attn_norm", "mlp_norm", "final_norm")  # stored as we use them: no transpose
# A buffer older exports saved beside the weights; it is derived from rope_theta, so it is skipped.
_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_config(values: dict) -> LWMConfig:
    """An `LWMConfig` from a Hugging Face LLaMA config.json dict; ValueError for what it cannot represent."""

    def reject(field, why):
        raise ValueError(f"unsupported Hugging Face config: {field}={values.get(field)!r} ({why})")

    if values.get("model_type") != "llama":
        reject("model_type", "only 'llama' is supported")
    if values.get("hidden_act", "silu") != "silu":
        reject("hidden_act", "the feedforward is SwiGLU")
    if values.get("rope_scaling") is not None:
        reject("rope_scaling", "only plain rotary positions are supported")
    for field in ("attention_bias", "mlp_bias"):
        if values.get(field):
            reject(field, "the projections have no bias")
    missing = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if f not in values]
    if missing:
        raise ValueError(f"Hugging Face config lacks {missing}")
    heads = values["num_attention_heads"]
    if values.get("head_dim") is not None and values["head_dim"] * heads != values["hidden_size"]:
        reject("head_dim", f"must be hidden_size / num_attention_heads = {values['hidden_size'] / heads}")
    # transformers >= 5 writes rope_parameters {rope_type, rope_theta}; older files rope_theta at the top.
    theta = values.get("rope_theta")
    rope = values.get("rope_parameters")
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" or set(rope) - {"rope_type", "type", "rope_theta"}:
            reject("rope_parameters", "only plain rotary positions are supported")
        if theta is not None and rope.get("rope_theta", theta) != theta:
            reject("rope_parameters", f"its rope_theta disagrees with rope_theta={theta}")
        theta = rope.get("rope_theta", theta)
    return LWMConfig(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_layers=values["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=values.get("num_key_value_heads") or heads,
        rms_norm_eps=float(values.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta if theta is not None else 10000.0),
        max_position_embeddings=values.get("max_position_embeddings", 2048),
    )


def load_hf_checkpoint(path, dtype=jnp.float32, mesh=None):
    """(LWMConfig, params) from a Hugging Face LLaMA folder: config.json and model.safetensors, or
    shards listed by model.safetensors.index.json.

    `dtype`: the parameters' dtype (bfloat16 files are cast). `mesh`: the parameters are placed by
    `param_shardings` over it; None: on the default device (as in `model_zoo.checkpoint.load_model`).
    Missing or unexpected tensor names, and tensors of the wrong shape, are a ValueError.
    """
    path = pathlib.Path(path)
    values = json.loads((path / "config.json").read_text())
    config = hf_config(values)
    tied = bool(values.get("tie_word_embeddings", False))
    shapes, place = parameter_placement(config, mesh)
    flat_shapes, flat_place = _flat(shapes), _flat(place)  # by parameter name, layers' ones included

    # Every tensor name first (headers only), so a wrong checkpoint fails before any data is read.
    files = _safetensors_files(path)
    names = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                if name in names:
                    raise ValueError(f"tensor {name!r} is in both {names[name].name} and {file.name}")
                names[name] = file
    expected = {n: (key, None) for n, key in _TOP_PARAMS.items() if not (tied and key == "lm_head")}
    for i in range(config.num_layers):
        expected.update({f"model.layers.{i}.{hf}.weight": (ours, i) for hf, ours in _LAYER_PARAMS.items()})
    # A tied checkpoint that still carries its lm_head copy is fine: the embedding is what counts.
    ignored = {n for n in names if _INV_FREQ.fullmatch(n) or (tied and n == "lm_head.weight")}
    missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected) - ignored)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing tensors {missing}, "
                         f"unexpected tensors {unexpected}")

    buffers, left, params = {}, {}, {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                if name not in expected:
                    continue
                key, layer = expected[name]
                shape = flat_shapes[key].shape
                if key not in buffers:  # allocated on first use, freed once placed
                    buffers[key] = np.empty(shape, np.dtype(dtype))
                    left[key] = shape[0] if layer is not None else 1
                want = shape[1:] if layer is not None else shape
                linear = key not in _VECTORS_AND_EMBED
                tensor = _read(f, file, name)
                if tensor.shape != (want[::-1] if linear else want):
                    raise ValueError(f"tensor {name!r} has shape {tensor.shape}, the config needs "
                                     f"{want[::-1] if linear else want}")
                buffers[key][... if layer is None else layer] = tensor.T if linear else tensor  # casts
                del tensor
                left[key] -= 1
                if not left[key]:
                    params[key] = jax.device_put(buffers.pop(key), flat_place[key])
                    if key == "embed" and tied:
                        params["lm_head"] = jax.device_put(params["embed"].T, flat_place["lm_head"])
    layers = {k: params.pop(k) for k in _LAYER_PARAMS.values()}
    return config, {"embed": params["embed"], "layers": layers, "final_norm": params["final_norm"],
                    "lm_head": params["lm_head"]}


def convert_checkpoint(hf_path, out_dir, dtype=jnp.float32) -> LWMConfig:
    """Writes a Hugging Face LLaMA checkpoint as a model folder (`model_zoo.checkpoint.save_model`),
    with its tokenizer (tokenizer.json or tokenizer.model) when it has one."""
    config, params = load_hf_checkpoint(hf_path, dtype)
    tokenizer = folder_tokenizer(hf_path)
    if tokenizer is not None:
        check_fits(tokenizer, config.vocab_size)  # refused before anything is written
    save_model(out_dir, config, params)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out_dir)
    return config


def _flat(tree):
    return {**{k: v for k, v in tree.items() if k != "layers"}, **tree["layers"]}


def _safetensors_files(path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    held = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"{str(path)!r} has neither model.safetensors nor model.safetensors.index.json "
                            f"(only safetensors checkpoints are read); it holds {held}")


def _read(f, file, name):
    """One tensor as a numpy array. bfloat16 is read from the raw bytes: safetensors' numpy
    framework cannot return it in every version, and ml_dtypes gives numpy the type."""
    if f.get_slice(name).get_dtype() != "BF16":
        return f.get_tensor(name)
    with open(file, "rb") as raw:
        header_size = struct.unpack("<Q", raw.read(8))[0]
        entry = json.loads(raw.read(header_size))[name]
        begin, end = entry["data_offsets"]
        raw.seek(8 + header_size + begin)
        data = np.frombuffer(raw.read(end - begin), ml_dtypes.bfloat16)
    return data.reshape(entry["shape"])
