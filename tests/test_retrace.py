"""No retrace: each public entry point under `jax.jit`, called again with the same shapes, fresh
values and its static arguments rebuilt equal (a new mesh, new BlockSizes, a new Hardware), reuses
its first trace (`chex.assert_max_traces`) and its first compilation; the model zoo's training and
decoding loops compile their step once. A retrace of a ring under jit is a compile: seconds here,
minutes on a pod. A compile without a retrace (an input whose sharding changed between calls) is
counted from JAX's compile events, which chex does not see."""

import contextlib
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv, random_segments, ring_mesh
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ring_attn

SEQ = P(None, "sp")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(autouse=True)
def fresh_trace_counter():
    # chex counts traces per definition site for the whole session; each test starts from zero.
    chex.clear_trace_counter()


@contextlib.contextmanager
def compiles():
    """The names (`jit(fn)`) of the XLA compilations run inside the block."""
    names = []

    def listen(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def assert_traced_and_compiled_once(fn, args, static=dict, context=contextlib.nullcontext, calls=2):
    """jit(fn) called `calls` times, with args(i) (same shapes, fresh values) and the keyword
    arguments static() marks static, built anew for every call inside a new context(), traces
    and compiles once."""
    jitted = jax.jit(chex.assert_max_traces(fn, n=1), static_argnames=tuple(static()))
    with compiles() as names:
        for i in range(calls):
            with context():
                jax.block_until_ready(jitted(*args(i), **static()))
    count = names.count(f"jit({fn.__name__})")
    assert count == 1, f"{fn.__name__} compiled {count} times in {calls} calls: {names}"


def qkv(B=2, L=64, N=4, K=2, H=16):
    """Inputs of fixed shapes whose values change with the call."""
    return lambda i: random_qkv(i, B, L, N, K, H)[:3]


def loss_and_grads(attend):
    """value_and_grad of sum(attend(q, k, v)) w.r.t. q, k, v: what a training step traces."""
    return jax.value_and_grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2))


class Options:
    """Equal in content each time, but without __eq__ / __hash__: a new one is a new static argument."""

    causal = True


def test_a_retrace_trips_the_check_on_the_second_call():
    def attend(q, k, v, *, options):
        return ring_attn.ring_attention(q, k, v, causal=options.causal)

    calls = []
    with pytest.raises(AssertionError, match="'attend' is traced > 1 times"):
        assert_traced_and_compiled_once(attend, lambda i: calls.append(i) or qkv()(i), lambda: dict(options=Options()))
    assert calls == [0, 1]  # the first call passed, the second tripped


def test_a_recompile_without_a_retrace_trips_the_check():
    """The same shapes resharded: the trace is reused (chex passes), the program compiled again."""
    mesh = ring_mesh(8)

    def attend(q, k, v):
        return ring_attn.ring_attention(q, k, v)

    def args(i):
        sharding = NamedSharding(mesh, SEQ if i == 0 else P())
        return jax.device_put(qkv()(i), sharding)

    with pytest.raises(AssertionError, match="attend compiled 2 times in 2 calls"):
        assert_traced_and_compiled_once(attend, args)


def test_ring_attention_in_shard_map():
    def step(q, k, v, ids, sinks, *, mesh, block_sizes):
        def attend(q, k, v):
            local = functools.partial(
                ring_attn.ring_attention, axis_name="sp", causal=True, layout="zigzag", logit_soft_cap=5.0,
                block_sizes=block_sizes,
            )
            return jax.shard_map(
                lambda q, k, v, ids, sinks: local(q, k, v, segment_ids=ids, sinks=sinks), mesh=mesh,
                in_specs=(SEQ, SEQ, SEQ, SEQ, P()), out_specs=SEQ,
            )(q, k, v, ids, sinks)

        return loss_and_grads(attend)(q, k, v)

    def args(i):
        return (*qkv()(i), random_segments(i, 2, 64), jnp.asarray(np.random.default_rng(i).normal(size=4), jnp.float32))

    assert_traced_and_compiled_once(step, args, lambda: dict(mesh=ring_mesh(8), block_sizes=ring_attn.BlockSizes(2, 2)))


def test_ring_attention_global():
    def step(q, k, v, ids, *, mesh, layout, block_sizes):
        attend = functools.partial(
            ring_attn.ring_attention_global, mesh=mesh, axis_name="sp", segment_ids=ids, layout=layout, causal=True,
            block_sizes=block_sizes,
        )
        return loss_and_grads(attend)(q, k, v)

    def args(i):  # 60 tokens: padded inside to a length the ring divides
        return (*qkv(L=60)(i), random_segments(i, 2, 60))

    assert_traced_and_compiled_once(
        step, args, lambda: dict(mesh=ring_mesh(8), layout="zigzag", block_sizes=ring_attn.BlockSizes(4, 4, 2, 2))
    )


@pytest.mark.parametrize("entry", ["dot_product_attention", "flax_attention_fn"])
def test_drop_in(entry):
    def step(q, k, v, key_lengths, *, is_causal, local_window_size, scale):
        if entry == "dot_product_attention":
            attend = functools.partial(
                ring_attn.dot_product_attention, is_causal=is_causal, key_value_seq_lengths=key_lengths,
                local_window_size=local_window_size, scale=scale, axis_name="sp",
            )
        else:  # a Flax module holds the attention_fn and calls it at each trace of its step; no lengths
            attention_fn = ring_attn.flax_attention_fn("sp", scale=scale, local_window_size=local_window_size)
            attend = functools.partial(attention_fn, is_causal=is_causal, deterministic=True)
        return loss_and_grads(attend)(q, k, v)

    def args(i):
        return (*qkv()(i), jnp.asarray([40 + i, 17], jnp.int32))

    # The mesh in context is rebuilt for each call, as `with jax.set_mesh(make_mesh())` around a step does.
    mesh = lambda: jax.set_mesh(Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sp")))  # noqa: E731
    static = lambda: dict(is_causal=True, local_window_size=(7, 0), scale=0.3)  # noqa: E731
    assert_traced_and_compiled_once(step, args, static, context=mesh)


# "ring" is ring_attention's path, above. Forward only: the backward is traced inside the same trace.
@pytest.mark.parametrize(
    "strategy,mesh_shape", [("all_gather", (8,)), ("ulysses", (4,)), ("usp", (2, 4)), ("auto", (4,))]
)
def test_context_attention(strategy, mesh_shape):
    axes = ("sp", "uly")[: len(mesh_shape)]

    def step(q, k, v, *, mesh, strategy, hardware):
        spec = P(None, axes)
        local = functools.partial(
            ring_attn.context_attention, axis_name=axes if strategy == "usp" else axes[0], strategy=strategy,
            causal=True, hardware=hardware,
        )
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)

    def static():
        mesh = Mesh(np.array(jax.devices()[: np.prod(mesh_shape)]).reshape(mesh_shape), axes)
        hardware = dataclasses.replace(ring_attn.cost.HARDWARE["h100-nvlink"])  # equal, not the same object
        return dict(mesh=mesh, strategy=strategy, hardware=hardware)

    assert_traced_and_compiled_once(step, qkv(N=8, K=4), static)


def test_blockwise_feedforward():
    def step(x, w_gate, w_up, w_down, *, chunk_size):
        loss = lambda *a: ring_attn.blockwise_feedforward(*a, chunk_size=chunk_size).sum()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)

    def args(i):
        rng = np.random.default_rng(i)
        shapes = ((2, 64, 16), (16, 48), (16, 48), (48, 16))
        return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)

    assert_traced_and_compiled_once(step, args, lambda: dict(chunk_size=16))


def test_decode_loop_compiles_its_step_once():
    """Cache update and decode, one token a step, the cache fed back (donated) and the position
    advanced as an array: the step after the first reuses its trace and its compilation."""
    B, C, N, K, H, steps = 2, 4, 4, 2, 16, 4

    @functools.partial(jax.jit, static_argnames="mesh", donate_argnums=(0, 1))
    @chex.assert_max_traces(n=1)
    def step(k_cache, v_cache, q, k_new, v_new, position, *, mesh):
        def local(k_cache, v_cache, q, k_new, v_new, position):
            options = dict(axis_name="sp", layout="zigzag")
            k_cache, v_cache = ring_attn.ring_cache_update(k_cache, v_cache, k_new, v_new, position=position, **options)
            return k_cache, v_cache, ring_attn.ring_decode(q, k_cache, v_cache, kv_length=position + 1, **options)

        return jax.shard_map(
            local, mesh=mesh, in_specs=(SEQ, SEQ, P(), P(), P(), P()), out_specs=(SEQ, SEQ, P())
        )(k_cache, v_cache, q, k_new, v_new, position)

    # The caches start where a prefill leaves them: sharded over the ring.
    k_cache, v_cache = (jax.device_put(jnp.zeros((B, 8 * C, K, H)), NamedSharding(ring_mesh(8), SEQ)) for _ in "kv")
    position = jnp.zeros((B,), jnp.int32)
    with compiles() as names:
        for i in range(steps):
            q, k_new, v_new, _ = random_qkv(i, B, 1, N, K, H)
            k_cache, v_cache, out = step(k_cache, v_cache, q, k_new, v_new, position, mesh=ring_mesh(8))
            position = position + 1
        jax.block_until_ready(out)
    assert names.count("jit(step)") == 1, names


def test_generation_compiles_prefill_and_decode_once(monkeypatch):
    import model_zoo.generate as generation
    from model_zoo import TINY, init_params, make_mesh

    monkeypatch.setattr(generation, "decode_step", chex.assert_max_traces(generation.decode_step, n=1))
    # A rope_theta no other test uses: the module-level jits compile afresh for this static config.
    config = TINY.replace(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_kv_heads=2,
                          ring_layout="zigzag", rope_theta=12_345.0)
    params = init_params(config, jax.random.key(0))
    with jax.set_mesh(make_mesh(dp=2, tp=2, sp=2)), compiles() as names:
        tokens = generation.generate(params, [[1, 2, 3], [4, 5]], config=config, max_new_tokens=5)
    assert [len(t) for t in tokens] == [5, 5]
    assert (names.count("jit(_prefill)"), names.count("jit(_decode)")) == (1, 1), names


@pytest.mark.slow
def test_training_loop_compiles_its_step_once(tmp_path, monkeypatch):
    """`train` runs a stage's jitted step again and again on the state the last step returned: one
    trace and one compile, so the state comes back placed as it went in (parameters over fsdp here)."""
    import model_zoo.train as training
    from model_zoo import TINY

    monkeypatch.setattr(training, "loss_fn", chex.assert_max_traces(training.loss_fn, n=1))
    cfg = training.TrainConfig(
        model=TINY.replace(num_layers=1), stages=(training.Stage(32, 1e4, 3),), batch_size=2,
        mesh=(("fsdp", 2), ("sp", 4)),
    )
    with compiles() as names:
        training.train(cfg, tmp_path, progress=False)
    assert len(training.read_metrics(tmp_path / "metrics.jsonl")) == 3
    assert names.count("jit(step)") == 1, names


def test_eager_ring_attention_global_compiles_once():
    mesh = ring_mesh(4)
    with compiles() as names:
        counts = []
        for i in range(2):
            q, k, v = qkv(B=1, L=16, N=2, K=1, H=8)(i)
            jax.block_until_ready(ring_attn.ring_attention_global(q, k, v, mesh=mesh, axis_name="sp", causal=True))
            counts.append(len(names))
    assert counts[1] == counts[0], f"the second call compiled {counts[1] - counts[0]} programs: {names[counts[0]:]}"
