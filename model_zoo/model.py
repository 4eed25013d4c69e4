"""The LWM decoder (LLaMA): RMSNorm, rotary positions, ring attention, SwiGLU, layers under `lax.scan`.

Parameters are a plain pytree with the layers stacked on a leading axis. Inside a mesh with axes
("dp", "fsdp", "tp", "sp", "uly") (see `model_zoo.sharding`), the batch is split over dp and fsdp,
the sequence over sp and uly (attention runs there by `config.attention_strategy`: a ring over sp
by default, Ulysses inside the ring with uly > 1), heads and feedforward columns over tp.
Outside a mesh the same code runs on one device.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from model_zoo.config import LWMConfig
from model_zoo.sharding import BATCH, SEQUENCE, attention_axes, model_mesh
from ring_attn import (
    blockwise_feedforward,
    context_attention,
    ring_attention,
    ring_cache_update,
    ring_decode,
    unzigzag,
    zigzag,
)

INIT_STD = 0.02


def init_params(config: LWMConfig, key, dtype=jnp.float32) -> dict:
    """Random parameters: normal(0.02) weights, residual outputs scaled by 1/sqrt(2 * layers), unit norms."""
    D, F, H, n = config.hidden_size, config.intermediate_size, config.head_dim, config.num_layers
    N, K = config.num_heads, config.num_kv_heads
    keys = iter(jax.random.split(key, 11))
    out_std = INIT_STD / (2 * n) ** 0.5

    def normal(shape, std=INIT_STD):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers = {
        "attn_norm": jnp.ones((n, D), dtype),
        "wq": normal((n, D, N * H)),
        "wk": normal((n, D, K * H)),
        "wv": normal((n, D, K * H)),
        "wo": normal((n, N * H, D), out_std),
        "mlp_norm": jnp.ones((n, D), dtype),
        "w_gate": normal((n, D, F)),
        "w_up": normal((n, D, F)),
        "w_down": normal((n, F, D), out_std),
    }
    if config.attention_sinks:  # a sink logit of 0 per head: as if one more key scored 0
        layers["sinks"] = jnp.zeros((n, N), jnp.float32)
    params = {
        "embed": normal((config.vocab_size, D)),
        "layers": layers,
        "final_norm": jnp.ones((D,), dtype),
        "lm_head": normal((D, config.vocab_size)),
    }
    if config.vision:
        params["vision_embed"] = normal((config.vision_vocab_size, D))
        params["vision_head"] = normal((D, config.vision_vocab_size))
    return params


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, theta):
    """Rotary embedding in the split-half convention of Hugging Face LLaMA checkpoints.

    x: [B, L, heads, H]; positions: int [B, L]. Dimension i pairs with i + H/2.
    """
    H = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, H/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attention(q, k, v, segment_ids, sinks, config, mesh):
    """Causal attention: over the sequence axes of the model mesh by `config.attention_strategy`,
    blockwise on one device outside a mesh. `sinks` [N] or None; heads split over "tp"."""
    options = dict(causal=True, impl=config.attention_impl, logit_soft_cap=config.attn_logit_soft_cap)
    if mesh is None:
        return ring_attention(q, k, v, segment_ids=segment_ids, sinks=sinks, **options)
    strategy, axis_name = attention_axes(config, dict(mesh.shape))
    attend = functools.partial(
        context_attention, axis_name=axis_name, strategy=strategy, layout=config.ring_layout, **options
    )
    heads, rows = P(BATCH, SEQUENCE, "tp", None), P(BATCH, SEQUENCE)
    optional = (jax.tree.map(lambda _: rows, segment_ids), jax.tree.map(lambda _: P("tp"), sinks))
    return jax.shard_map(
        lambda q, k, v, ids, sinks: attend(q, k, v, segment_ids=ids, sinks=sinks),
        in_specs=(heads, heads, heads, *optional),
        out_specs=heads,
    )(q, k, v, segment_ids, sinks)


def _score_options(p, config):
    """The soft-cap and sinks of a layer's attention, as keyword arguments; none when unused."""
    options = {}
    if config.attn_logit_soft_cap is not None:
        options["logit_soft_cap"] = config.attn_logit_soft_cap
    if "sinks" in p:
        options["sinks"] = p["sinks"]
    return options


def _feedforward(x, p, config, mesh):
    """SwiGLU a chunk of tokens at a time; with a mesh, columns split over "tp" and summed back."""
    ffn = functools.partial(blockwise_feedforward, chunk_size=config.ffn_chunk)
    if mesh is None:
        return ffn(x, p["w_gate"], p["w_up"], p["w_down"])
    tokens = P(BATCH, SEQUENCE, None)
    return jax.shard_map(
        lambda x, wg, wu, wd: lax.psum(ffn(x, wg, wu, wd), "tp"),
        in_specs=(tokens, P(None, "tp"), P(None, "tp"), P("tp", None)),
        out_specs=tokens,
    )(x, p["w_gate"], p["w_up"], p["w_down"])


def _layer(x, p, *, positions, segment_ids, config, mesh, attention, return_cache):
    B, L, _ = x.shape
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
    q = rotary((h @ p["wq"]).reshape(B, L, N, H), positions, config.rope_theta)
    k = rotary((h @ p["wk"]).reshape(B, L, K, H), positions, config.rope_theta)
    v = (h @ p["wv"]).reshape(B, L, K, H)
    if attention is None:
        o = _attention(q, k, v, segment_ids, p.get("sinks"), config, mesh)
    else:
        o = attention(q, k, v, segment_ids, **_score_options(p, config))
    x = _constrain(x + o.reshape(B, L, N * H) @ p["wo"], mesh)
    h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
    return _constrain(x + _feedforward(h, p, config, mesh), mesh), ((k, v) if return_cache else None)


def _constrain(x, mesh):
    return x if mesh is None else lax.with_sharding_constraint(x, P(BATCH, SEQUENCE, None))


def _remat(fn, policy):
    if policy == "none":
        return fn
    saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
    return jax.checkpoint(fn, policy=saveable, prevent_cse=False)


def hidden_states(
    params, tokens, *, config, segment_ids=None, positions=None, vision_mask=None, attention=None, return_cache=False
):
    """The final normalised hidden states [B, L, D] (float32 for float32 parameters).

    Args:
      tokens: int [B, L]. With `config.vision`, tokens where `vision_mask` is True index the
        vision vocabulary instead of the text one.
      segment_ids: int [B, L]: packed documents; attention never crosses ids. None: one document.
      positions: int [B, L]: rotary positions (restarting per packed document). None: 0..L-1.
      attention: None for ring attention, or a function (q, k, v, segment_ids) -> out that
        replaces it (for comparing with a dense oracle).
      return_cache: also return every layer's keys and values, ([layers, B, L, K, H],) * 2, in the
        ring's layout (zigzag order for a zigzag ring): the KV cache a prefill leaves for decoding.
    """
    _check_inputs(tokens, segment_ids, positions, vision_mask, config)
    B, L = tokens.shape
    mesh = model_mesh(config, B, L)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    inputs = (tokens, segment_ids, positions, vision_mask)
    reorder = mesh is not None and config.ring_layout == "zigzag"
    if reorder:  # zigzag balances causal work; the ring then knows each shard's global positions
        inputs = jax.tree.map(lambda a: zigzag(a, _sequence_devices(mesh), axis=1), inputs)
    tokens, segment_ids, positions, vision_mask = inputs
    x = _embed(params, tokens, vision_mask)
    layer = functools.partial(
        _layer, positions=positions, segment_ids=segment_ids, config=config, mesh=mesh, attention=attention,
        return_cache=return_cache,
    )
    layer = _remat(layer, config.remat)
    x, cache = lax.scan(lambda x, p: layer(x, p), _constrain(x, mesh), params["layers"])
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    x = unzigzag(x, _sequence_devices(mesh), axis=1) if reorder else x
    return (x, cache) if return_cache else x


def forward(params, tokens, *, config, segment_ids=None, positions=None, vision_mask=None, attention=None):
    """Text logits [B, L, vocab_size] in float32; arguments as in `hidden_states`."""
    x = hidden_states(
        params, tokens, config=config, segment_ids=segment_ids, positions=positions,
        vision_mask=vision_mask, attention=attention,
    )
    return text_logits(params, x)


def text_logits(params, x):
    return (x @ params["lm_head"]).astype(jnp.float32)


def vision_logits(params, x):
    return (x @ params["vision_head"]).astype(jnp.float32)


def _embed(params, tokens, vision_mask):
    if vision_mask is None:
        return params["embed"][tokens]
    text = params["embed"][jnp.where(vision_mask, 0, tokens)]
    vision = params["vision_embed"][jnp.where(vision_mask, tokens, 0)]
    return jnp.where(vision_mask[..., None], vision, text)


def _check_inputs(tokens, segment_ids, positions, vision_mask, config):
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be an int array [batch, length], got {getattr(tokens, 'dtype', type(tokens))} "
            f"{getattr(tokens, 'shape', '')}"
        )
    for name, a in (("segment_ids", segment_ids), ("positions", positions), ("vision_mask", vision_mask)):
        if a is not None and a.shape != tokens.shape:
            raise ValueError(f"{name} must have the tokens' shape {tokens.shape}, got {a.shape}")
    if vision_mask is not None and not config.vision:
        raise ValueError("vision_mask was given but the config has vision=False")


def decode_step(params, cache, tokens, positions, *, config):
    """One decoding step against the KV cache a prefill left (`hidden_states(..., return_cache=True)`).

    tokens: int [B, 1], the newest token of each row, at `positions` (int [B]). Inside the model
    mesh the cache stays sharded over "sp" as the ring laid it out: each device writes the new
    key/value if it owns that position, attends the token to its own shard, and one collective
    merges the partial results (`ring_attn.ring_decode`). Returns (float32 logits [B, V], cache).
    """
    x, cache = decode_hidden(params, cache, tokens, positions, config=config)
    return text_logits(params, x), cache


def decode_hidden(params, cache, tokens, positions, *, config, vision_mask=None):
    """`decode_step`'s final hidden state [B, D] and cache; tokens where `vision_mask` (bool [B, 1])
    is True index the vision vocabulary."""
    B = tokens.shape[0]
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    mesh = model_mesh(config, B, cache[0].shape[2])
    rope_positions = positions[:, None]

    def layer(x, inputs):
        p, (k_cache, v_cache) = inputs
        h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q = rotary((h @ p["wq"]).reshape(B, 1, N, H), rope_positions, config.rope_theta)
        k = rotary((h @ p["wk"]).reshape(B, 1, K, H), rope_positions, config.rope_theta)
        v = (h @ p["wv"]).reshape(B, 1, K, H)
        o, k_cache, v_cache = _decode_attention(q, k, v, k_cache, v_cache, positions, p.get("sinks"), config, mesh)
        x = x + o.reshape(B, 1, N * H) @ p["wo"]
        h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
        x = x + blockwise_feedforward(h, p["w_gate"], p["w_up"], p["w_down"], chunk_size=1)
        return x, (k_cache, v_cache)

    x, cache = lax.scan(layer, _embed(params, tokens, vision_mask), (params["layers"], cache))
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)[:, 0], cache


def _decode_attention(q, k, v, k_cache, v_cache, positions, sinks, config, mesh):
    def attend(q, k, v, k_cache, v_cache, positions, sinks, axis_name):
        kw = dict(axis_name=axis_name, layout=config.ring_layout if axis_name else "contiguous")
        k_cache, v_cache = ring_cache_update(k_cache, v_cache, k, v, position=positions, **kw)
        out = ring_decode(q, k_cache, v_cache, kv_length=positions + 1, logit_soft_cap=config.attn_logit_soft_cap,
                          sinks=sinks, **kw)
        return out, k_cache, v_cache

    if mesh is None:
        return attend(q, k, v, k_cache, v_cache, positions, sinks, None)
    token, cached = P(BATCH, None, "tp", None), P(BATCH, SEQUENCE, "tp", None)
    return jax.shard_map(
        functools.partial(attend, axis_name=SEQUENCE),
        in_specs=(token, token, token, cached, cached, P(BATCH), jax.tree.map(lambda _: P("tp"), sinks)),
        out_specs=(token, cached, cached),
    )(q, k, v, k_cache, v_cache, positions, sinks)


def _sequence_devices(mesh):
    """How many devices the sequence lies over (its layout is over all of them)."""
    return mesh.shape["sp"] * mesh.shape["uly"]
