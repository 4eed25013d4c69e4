"""context_attention: every strategy, both layouts, on 8 simulated devices (1-D, 2 x 4, 4 x 2),
against the float64 oracle on the unsharded arrays, forward and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, assert_matches_oracle, oracle, output_and_grads, random_qkv, random_segments
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import ring_attn

# (strategy, mesh shape): the usp meshes name (ring axis, ulysses axis).
SETUPS = [("ring", (8,)), ("all_gather", (8,)), ("ulysses", (8,)), ("usp", (2, 4)), ("usp", (4, 2))]


def sharded(strategy, mesh_shape, layout, **options):
    """context_attention on global arrays in natural order: the mesh, the layout's reorder over all
    of its devices, the shard_map (default check_vma=True) with the sequence over every axis."""
    names = ("sp",) if len(mesh_shape) == 1 else ("ring", "uly")
    mesh = Mesh(np.array(jax.devices()[: int(np.prod(mesh_shape))]).reshape(mesh_shape), names)
    D = mesh.size
    axis_name = names[0] if len(names) == 1 else names
    seq = P(None, names)

    def reorder(x, inverse=False):
        if layout != "zigzag":
            return x
        return (ring_attn.unzigzag if inverse else ring_attn.zigzag)(x, D)

    def fn(q, k, v, ids=None, sinks=None):
        def local(q, k, v, ids, sinks):
            return ring_attn.context_attention(
                q, k, v, axis_name=axis_name, strategy=strategy, layout=layout, segment_ids=ids, sinks=sinks,
                **options,
            )

        ids_specs = jax.tree.map(lambda _: seq, ids)  # ids [B, L] or a pair (q_ids, kv_ids)
        sinks_spec = jax.tree.map(lambda _: P(), sinks)  # replicated
        out = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, ids_specs, sinks_spec), out_specs=seq)(
            reorder(q), reorder(k), reorder(v), jax.tree.map(reorder, ids), sinks
        )
        return reorder(out, inverse=True)

    return fn


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("strategy,mesh_shape", SETUPS)
def test_causal_segments_gqa_match_oracle(strategy, mesh_shape, layout):
    # GQA 8:2 (Ulysses over 8 devices replicates the kv heads; over 4 or 2 it splits them),
    # packed documents, causal: forward and gradients against the float64 oracle.
    L, N, K, H = 128, 8, 2, 32
    q, k, v, d_out = random_qkv(2 * SETUPS.index((strategy, mesh_shape)) + (layout == "zigzag"), 1, L, N, K, H)
    ids = random_segments(7, 1, L, 4)
    fn = sharded(strategy, mesh_shape, layout, causal=True)
    out, grads = output_and_grads(lambda q, k, v: fn(q, k, v, ids), q, k, v, d_out)
    expected, expected_grads = oracle(q, k, v, d_out, causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)


@pytest.mark.parametrize("strategy,mesh_shape", SETUPS)
def test_bidirectional_mha_matches_oracle(strategy, mesh_shape):
    L, N, K, H = 64, 8, 8, 16
    q, k, v, d_out = random_qkv(3, 2, L, N, K, H)
    fn = sharded(strategy, mesh_shape, "zigzag")
    out, grads = output_and_grads(fn, q, k, v, d_out)
    expected, expected_grads = oracle(q, k, v, d_out)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)


@pytest.mark.parametrize("strategy,mesh_shape", SETUPS)
def test_mla_values_of_their_own_width(strategy, mesh_shape):
    # q/k 48, v 32 (MLA's shape, smaller), causal zigzag with segments and GQA 8:2: every strategy
    # moves v by its own width (the all-gather, the all-to-alls, the ring).
    L, N, K = 64, 8, 2
    q, k, v, d_out = random_qkv(12, 1, L, N, K, 48, Hv=32)
    ids = random_segments(13, 1, L, 3)
    fn = sharded(strategy, mesh_shape, "zigzag", causal=True)
    assert_matches_oracle(lambda q, k, v: fn(q, k, v, ids), q, k, v, d_out, causal=True, q_segment_ids=ids,
                          kv_segment_ids=ids)


@pytest.mark.parametrize("strategy,mesh_shape", SETUPS)
def test_soft_cap_and_sinks_match_oracle(strategy, mesh_shape):
    # Ulysses gives each device the sinks of its own heads; the sinks' gradient, every device's
    # share summed, against the oracle's.
    L, N, K, H = 64, 8, 2, 32
    q, k, v, d_out = random_qkv(9, 1, L, N, K, H)
    q, k = 2.0 * q, 2.0 * k  # scores well past the cap
    sinks = jnp.asarray(np.random.default_rng(10).normal(0.5, 1.0, N), jnp.float32)
    ids = random_segments(11, 1, L, 3)
    fn = sharded(strategy, mesh_shape, "zigzag", causal=True, logit_soft_cap=4.0)
    assert_matches_oracle(
        lambda q, k, v, sinks: fn(q, k, v, ids, sinks), q, k, v, d_out, sinks=sinks, causal=True, logit_soft_cap=4.0,
        q_segment_ids=ids, kv_segment_ids=ids,
    )


@pytest.mark.parametrize(
    "strategy,mesh_shape,layout",
    [("ring", (8,), "contiguous"), ("all_gather", (8,), "contiguous"), ("all_gather", (8,), "zigzag"),
     ("ulysses", (8,), "zigzag"), ("usp", (2, 4), "contiguous")],
)
def test_sliding_window_matches_oracle(strategy, mesh_shape, layout):
    L, N, K, H = 128, 8, 2, 32
    q, k, v, d_out = random_qkv(4, 1, L, N, K, H)
    fn = sharded(strategy, mesh_shape, layout, causal=True, window=24)
    out, grads = output_and_grads(fn, q, k, v, d_out)
    expected, expected_grads = oracle(q, k, v, d_out, causal=True, window=24)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)


def test_window_with_zigzag_usp_names_window():
    q, k, v, _ = random_qkv(5, 1, 64, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="window"):
        sharded("usp", (2, 4), "zigzag", causal=True, window=8)(q, k, v)


@pytest.mark.parametrize("strategy,mesh_shape", SETUPS)
def test_rows_with_no_visible_key_are_zero(strategy, mesh_shape):
    # Queries of document 9 find no key of theirs: out 0, gradients 0, never NaN.
    L = 64
    q, k, v, d_out = random_qkv(6, 1, L, 8, 2, 16)
    q_ids = jnp.asarray(np.where(np.arange(L) % 16 < 4, 9, np.arange(L) // 32)[None], jnp.int32)
    kv_ids = jnp.asarray((np.arange(L) // 32)[None], jnp.int32)
    fn = sharded(strategy, mesh_shape, "zigzag")
    out, grads = output_and_grads(lambda q, k, v: fn(q, k, v, (q_ids, kv_ids)), q, k, v, d_out)
    expected, expected_grads = oracle(q, k, v, d_out, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    np.testing.assert_array_equal(np.asarray(out)[0, np.asarray(q_ids[0]) == 9], 0.0)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)


@pytest.mark.parametrize("strategy,mesh_shape", [("all_gather", (8,)), ("ulysses", (8,)), ("usp", (2, 4))])
@pytest.mark.parametrize("transform", ["vmap", "checkpoint"])
def test_under_vmap_and_checkpoint(strategy, mesh_shape, transform):
    L, N, K, H = 64, 8, 4, 16
    q, k, v, d_out = random_qkv(8, 2, L, N, K, H)
    fn = sharded(strategy, mesh_shape, "zigzag", causal=True)
    if transform == "vmap":  # over the batch, one row at a time
        wrapped = jax.vmap(lambda q, k, v: fn(q[None], k[None], v[None])[0])
    else:
        wrapped = jax.checkpoint(fn)
    out, grads = output_and_grads(wrapped, q, k, v, d_out)
    expected, expected_grads = oracle(q, k, v, d_out, causal=True)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)


@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)])
def test_auto_runs_the_strategy_the_cost_model_ranks_first(mesh_shape, monkeypatch):
    # "auto" asks ring_attn.cost, for the hardware given, and runs the cheapest strategy this
    # axis_name can run (usp needs two axes); the result is the same as that strategy's.
    L, N, K, H = 64, 8, 2, 16
    q, k, v, _ = random_qkv(12, 1, L, N, K, H)
    chosen, choose = [], ring_attn.cost.choose_strategy

    def recording(*args, **kwargs):
        chosen.append(choose(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(ring_attn.cost, "choose_strategy", recording)
    out = jax.jit(sharded("auto", mesh_shape, "zigzag", causal=True, hardware="tpu-v5p"))(q, k, v)
    (choice,) = chosen
    runnable = ("usp",) if len(mesh_shape) == 2 else ("ring", "all_gather", "ulysses")
    expected_strategy = min(runnable, key=choice.costs.get)
    expected = jax.jit(sharded(expected_strategy, mesh_shape, "zigzag", causal=True))(q, k, v)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.slow
def test_strategies_agree_to_float32_rounding():
    L, N, K, H = 128, 8, 2, 32
    q, k, v, _ = random_qkv(9, 1, L, N, K, H)
    results = {s: np.asarray(jax.jit(sharded(s, m, "zigzag", causal=True))(q, k, v)) for s, m in SETUPS}
    for (s, m), r in zip(SETUPS, results.values()):
        err = np.linalg.norm(r - results["ring"]) / np.linalg.norm(results["ring"])
        assert err < 2e-6, f"{s} on {m} differs from the ring by {err:.2e}"


@pytest.mark.parametrize(
    "strategy,mesh_shape,shape,message",
    [
        ("ulysses", (4,), (6, 6), r"Ulysses splits q's N=6 heads over the 4 devices of axis 'sp'"),
        ("ulysses", (4,), (12, 3), r"Ulysses splits k's K=3 heads over the 4 devices of axis 'sp'"),
        ("usp", (2, 4), (6, 6), r"Ulysses splits q's N=6 heads over the 4 devices of axis 'uly'"),
    ],
)
def test_heads_that_do_not_divide_are_named(strategy, mesh_shape, shape, message):
    N, K = shape
    q, k, v, _ = random_qkv(10, 1, 32, N, K, 16)
    with pytest.raises(ValueError, match=message):
        sharded(strategy, mesh_shape, "contiguous")(q, k, v)


def test_bad_strategy_and_axis_name_are_named():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("ring", "uly"))
    q, k, v, _ = random_qkv(11, 1, 16, 4, 4, 16)

    def run(**kwargs):
        local = functools.partial(ring_attn.context_attention, **kwargs)
        return jax.shard_map(local, mesh=mesh, in_specs=P(None, ("ring", "uly")), out_specs=P(None, ("ring", "uly")))(
            q, k, v
        )

    with pytest.raises(ValueError, match=r"unknown strategy='tree'; expected one of"):
        run(axis_name="ring", strategy="tree")
    with pytest.raises(ValueError, match=r"strategy='usp' needs axis_name=\(ring_axis, ulysses_axis\), got"):
        run(axis_name="ring", strategy="usp")
    with pytest.raises(ValueError, match=r"strategy='ulysses' runs over one mesh axis"):
        run(axis_name=("ring", "uly"), strategy="ulysses")
    with pytest.raises(ValueError, match=r"axis_name='nope' is not bound: call context_attention"):
        run(axis_name=("ring", "nope"), strategy="usp")
