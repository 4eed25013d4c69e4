"""Generation: prefill with ring attention, then decode token by token against the ring-sharded cache.

Inside the model mesh (`jax.set_mesh(make_mesh(...))`) the cache never leaves the devices that the
prefill left it on; each step moves only one token's partial attention results between them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model_zoo.model import decode_step, hidden_states, text_logits
from model_zoo.sharding import model_mesh


def sample(logits, key, *, temperature=0.0, top_p=1.0):
    """Greedy for temperature 0; otherwise softmax(logits / temperature) cut to the smallest set of
    tokens whose probability reaches top_p (nucleus sampling). logits [B, V] -> int32 [B]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus: everything below it is dropped.
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, jnp.minimum(cutoff_index, logits.shape[-1] - 1), axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(max_new_tokens, temperature, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def cache_length(longest_prompt, max_new_tokens, config, mesh):
    """Room for the prompt and every new token, rounded so the ring's layout divides it."""
    unit = 1
    if mesh is not None:
        unit = mesh.shape["sp"] * mesh.shape["uly"] * (2 if config.ring_layout == "zigzag" else 1)
    need = longest_prompt + max_new_tokens
    return -(-need // unit) * unit


def generate(params, prompts, *, config, max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
             stop_tokens=(), pad_id=0, on_tokens=None, vision_masks=None):
    """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    A row stops after emitting one of `stop_tokens`. `on_tokens(step, tokens)` is called with each
    step's new tokens (a numpy int array [len(prompts)]) as they come, for streaming.
    `vision_masks`: per prompt, True where its token is a vision token (a clip to answer about).
    Returns the new tokens of each row (stop token included).
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    rows = len(prompts)
    tokens, lengths, vision_mask = prompt_batch(prompts, max_new_tokens, config, pad_id, vision_masks)
    logits, cache = _prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), config,
                             None if vision_mask is None else jnp.asarray(vision_mask))
    key = jax.random.key(seed)
    positions = jnp.asarray(lengths)
    done = np.zeros(len(tokens), bool)
    done[rows:] = True
    out = [[] for _ in range(rows)]
    stop = np.asarray(list(stop_tokens), np.int32)
    for step in range(max_new_tokens):
        new = np.asarray(sample(logits, jax.random.fold_in(key, step), temperature=temperature, top_p=top_p))
        live = ~done
        for i in np.flatnonzero(live[:rows]):
            out[i].append(int(new[i]))
        if on_tokens is not None:
            on_tokens(step, np.where(live[:rows], new[:rows], -1))
        done |= np.isin(new, stop)
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = _decode(params, cache, jnp.asarray(new[:, None]), positions, config)
        positions = positions + 1
    return out


def prompt_batch(prompts, max_new_tokens, config, pad_id=0, vision_masks=None):
    """The prompts padded into one batch with room for `max_new_tokens`: (tokens [B, L], lengths [B],
    vision mask [B, L] or None). B is rounded up to the mesh's data-parallel ranks with one-token
    rows, L so that the ring's layout divides it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if vision_masks is not None and [len(m) for m in vision_masks] != [len(p) for p in prompts]:
        raise ValueError("vision_masks must hold one mask per prompt, each as long as its prompt")
    mesh = jax.sharding.get_abstract_mesh()
    mesh = None if mesh.empty else mesh
    rows = len(prompts)
    batch = rows if mesh is None else (
        -(-rows // (mesh.shape["dp"] * mesh.shape["fsdp"])) * mesh.shape["dp"] * mesh.shape["fsdp"]
    )
    lengths = np.array([len(p) for p in prompts] + [1] * (batch - rows), np.int32)
    L = cache_length(int(lengths.max()), max_new_tokens, config, mesh)
    if L > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) needs {L} positions, "
            f"more than max_position_embeddings={config.max_position_embeddings}"
        )
    tokens = np.full((batch, L), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    vision_mask = None
    if vision_masks is not None:
        vision_mask = np.zeros((batch, L), bool)
        for i, m in enumerate(vision_masks):
            vision_mask[i, : len(m)] = m
    model_mesh(config, batch, L)  # validates shapes against the mesh
    return tokens, lengths, vision_mask


@functools.partial(jax.jit, static_argnames="config")
def _prefill(params, tokens, lengths, config, vision_mask=None):
    x, cache = hidden_states(params, tokens, config=config, vision_mask=vision_mask, return_cache=True)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return text_logits(params, last), cache


@functools.partial(jax.jit, static_argnames="config", donate_argnums=1)
def _decode(params, cache, tokens, positions, config):
    return decode_step(params, cache, tokens, positions, config=config)
