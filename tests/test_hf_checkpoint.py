"""Hugging Face LLaMA checkpoints: our logits match transformers' own, on one device and on the ring."""

import json

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close
from safetensors.numpy import load_file, save_file

from model_zoo.checkpoint import load_model
from model_zoo.hf import convert_checkpoint, load_hf_checkpoint
from model_zoo.model import forward, init_params
from model_zoo.sharding import batch_sharding, make_mesh, param_shardings

# The [test] extra installs torch (its CPU build) and transformers on Python 3.11 only.
torch = pytest.importorskip("torch", reason="Hugging Face parity needs torch: pip install torch transformers")
transformers = pytest.importorskip("transformers", reason="Hugging Face parity needs transformers")

SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    rope_theta=5e7, max_position_embeddings=1_048_576, rms_norm_eps=1e-5,
    initializer_range=0.2,  # large enough that attention and logits are far from uniform
)
_forward = jax.jit(forward, static_argnames="config")


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**SMALL, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so swapping two of them would show
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def save(model, directory, **kwargs):
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def random_tokens(seed, batch=2, length=64, vocab=SMALL["vocab_size"]):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def on_ring(path, tokens):
    """Logits with the parameters placed by `param_shardings` and the sequence split over 8 devices."""
    mesh = make_mesh(sp=8)

    config, params = load_hf_checkpoint(path, mesh=mesh)
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    assert params["layers"]["wq"].sharding == param_shardings(shapes, mesh)["layers"]["wq"]
    with jax.set_mesh(mesh):
        return config, _forward(params, jax.device_put(tokens, batch_sharding(mesh)), config=config)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = hf_model()
    return model, save(model, tmp_path_factory.mktemp("hf"))


def test_config_and_single_device_logits(base):
    model, path = base
    config, params = load_hf_checkpoint(path)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (128, 64, 96, 2)
    assert (config.num_heads, config.num_kv_heads, config.rms_norm_eps) == (4, 4, 1e-5)
    assert (config.rope_theta, config.max_position_embeddings) == (5e7, 1_048_576)
    assert params["layers"]["wq"].shape == (2, 64, 64) and params["lm_head"].shape == (64, 128)
    chex.assert_type(jax.tree.leaves(params), jnp.float32)
    tokens = random_tokens(1)
    assert_close(_forward(params, tokens, config=config), torch_logits(model, tokens), name="logits")


def test_ring_logits(base):
    model, path = base
    tokens = random_tokens(2)
    _, logits = on_ring(path, tokens)
    assert_close(logits, torch_logits(model, tokens), name="ring logits")


def test_grouped_query_attention_on_ring(tmp_path):
    model = hf_model(seed=3, num_key_value_heads=2)
    tokens = random_tokens(4)
    config, logits = on_ring(save(model, tmp_path), tokens)
    assert config.num_kv_heads == 2
    assert_close(logits, torch_logits(model, tokens), name="GQA ring logits")


def test_sharded_checkpoint_loads_the_same(base, tmp_path):
    model, path = base
    save(model, tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    _, whole = load_hf_checkpoint(path)
    _, sharded = load_hf_checkpoint(tmp_path)
    chex.assert_trees_all_equal(sharded, whole)


def test_legacy_config_as_lwm_publishes_it(base, tmp_path):
    """Older config.json (LWM-Text-Chat-1M's): rope_theta at the top level, no rope_parameters or head_dim."""
    _, path = base
    values = json.loads((path / "config.json").read_text())
    del values["rope_parameters"], values["head_dim"]
    values.update(rope_theta=5e7, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    assert load_hf_checkpoint(tmp_path)[0] == load_hf_checkpoint(path)[0]
    del values["rope_theta"]  # transformers' default then
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert load_hf_checkpoint(tmp_path)[0].rope_theta == 10000.0


def test_convert_then_load_model_round_trip(base, tmp_path):
    _, path = base
    config, params = load_hf_checkpoint(path)
    assert convert_checkpoint(path, tmp_path / "out") == config
    loaded_config, loaded = load_model(tmp_path / "out")
    assert loaded_config == config
    chex.assert_trees_all_equal(loaded, params)
    convert_checkpoint(path, tmp_path / "bf16", dtype=jnp.bfloat16)
    _, loaded = load_model(tmp_path / "bf16")
    chex.assert_type(jax.tree.leaves(loaded), jnp.bfloat16)
    chex.assert_trees_all_equal(loaded, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))


def test_convert_command_line(base, tmp_path, capsys):
    """`python -m model_zoo convert`, then `generate` refuses a tokenizer that is not the model's."""
    from model_zoo.__main__ import main

    _, path = base
    assert main(["convert", str(path), str(tmp_path / "model")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_model(tmp_path / "model")[0] == load_hf_checkpoint(path)[0]
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "hi", "--mesh", "sp=1"]) == 1
    assert "has 1024 tokens, more than the model's vocabulary of 128" in capsys.readouterr().err


def test_tied_embeddings(tmp_path):
    model = hf_model(seed=5, tie_word_embeddings=True)
    save(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    config, params = load_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(params["lm_head"], params["embed"].T)
    tokens = random_tokens(6)
    assert_close(_forward(params, tokens, config=config), torch_logits(model, tokens), name="tied logits")


def test_bfloat16_file(base, tmp_path):
    """bf16 tensors are read (numpy has no bf16 of its own) and cast exactly to the dtype asked for."""
    model, path = base
    save(hf_model().to(torch.bfloat16), tmp_path)
    _, params = load_hf_checkpoint(path)
    _, from_bf16 = load_hf_checkpoint(tmp_path)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
    chex.assert_trees_all_equal(from_bf16, rounded)
    _, as_bf16 = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    chex.assert_type(jax.tree.leaves(as_bf16), jnp.bfloat16)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_type", "mistral"),
        ("hidden_act", "gelu"),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 5e7, "factor": 4.0}),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("head_dim", 32),
    ],
)
def test_unsupported_config_is_rejected(base, tmp_path, field, value):
    _, path = base
    values = json.loads((path / "config.json").read_text())
    values[field] = value
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError) as error:
        load_hf_checkpoint(tmp_path)
    assert f"{field}={value!r}" in str(error.value)


def test_missing_and_unexpected_tensors_are_listed(base, tmp_path):
    _, path = base
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # old exports: skipped
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\], "
                                         r"unexpected tensors \['model.layers.2.mlp.up_proj.weight'\]"):
        load_hf_checkpoint(tmp_path)
