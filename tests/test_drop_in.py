"""ring_attn.dot_product_attention against jax.nn.dot_product_attention, on a 2 x 4 (data x sequence)
mesh: forward and gradients, under jit, with the options jax.nn takes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, assert_matches_oracle, output_and_grads, random_qkv
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ring_attn


def data_sequence_mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sp"))


def jax_nn_in_float64(q, k, v, d_out, **kwargs):
    """jax.nn.dot_product_attention's output and gradients, computed in float64."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out)]
        out, grads = output_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kwargs), *args)
        return np.asarray(out), [np.asarray(g) for g in grads]


def lengths(*values):
    return jnp.asarray(values, jnp.int32)


# (name, (B, L, N, K, H, S), jax.nn keyword arguments)
CASES = [
    ("causal", (2, 64, 4, 4, 32, None), dict(is_causal=True)),
    ("not causal", (2, 64, 4, 4, 32, None), dict()),
    ("causal GQA 4:1", (2, 64, 4, 1, 32, None), dict(is_causal=True)),
    ("GQA 8:2", (2, 32, 8, 2, 16, None), dict()),
    ("window int (symmetric)", (2, 64, 4, 2, 32, None), dict(local_window_size=5)),
    ("window (left, 0)", (2, 64, 4, 4, 32, None), dict(local_window_size=(7, 0))),
    ("causal with window (left, right)", (2, 64, 4, 4, 32, None), dict(is_causal=True, local_window_size=(9, 3))),
    ("window (w, w) on a ragged length", (2, 60, 4, 4, 16, None), dict(local_window_size=(6, 6))),
    ("key lengths", (2, 64, 4, 4, 32, None), dict(key_value_seq_lengths=lengths(40, 17))),
    ("causal, query and key lengths", (2, 64, 4, 2, 32, None),
     dict(is_causal=True, query_seq_lengths=lengths(50, 9), key_value_seq_lengths=lengths(64, 33))),
    ("causal, a length no ring divides", (2, 37, 4, 4, 32, None), dict(is_causal=True)),
    ("not causal, a length no ring divides, key lengths", (2, 30, 4, 2, 32, None),
     dict(key_value_seq_lengths=lengths(30, 11))),
    ("cross attention, other key length", (2, 32, 4, 4, 32, 48), dict()),
    ("custom scale", (2, 64, 4, 4, 32, None), dict(is_causal=True, scale=0.37)),
    ("custom scale as a NumPy scalar", (2, 32, 4, 4, 16, None), dict(scale=np.float32(0.29))),
]


@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_matches_jax_nn(name, shape, kwargs):
    B, L, N, K, H, S = shape
    q, k, v, d_out = random_qkv(len(name), B, L, N, K, H, S=S)
    expected, expected_grads = jax_nn_in_float64(q, k, v, d_out, **kwargs)
    with jax.set_mesh(data_sequence_mesh()):
        fn = lambda q, k, v: ring_attn.dot_product_attention(q, k, v, axis_name="sp", **kwargs)  # noqa: E731
        out, grads = output_and_grads(fn, q, k, v, d_out)
    assert_close(out, expected, name="out")
    for grad_name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=grad_name)


@pytest.mark.slow
def test_mla_values_of_their_own_width():
    # jax.nn takes one head dim for q, k and v; the ring also takes v of its own (MLA): against the
    # float64 oracle, with jax.nn's default scale 1 / sqrt(q's head dim).
    q, k, v, d_out = random_qkv(7, 2, 64, 4, 2, 48, Hv=32)
    with jax.set_mesh(data_sequence_mesh()):
        fn = lambda q, k, v: ring_attn.dot_product_attention(q, k, v, axis_name="sp", is_causal=True)  # noqa: E731
        assert_matches_oracle(fn, q, k, v, d_out, causal=True)


def test_outside_jit_keeps_the_batch_where_it_lies():
    mesh = data_sequence_mesh()
    q, k, v, _ = random_qkv(3, 2, 64, 4, 2, 32)
    expected, _ = jax_nn_in_float64(q, k, v, q, is_causal=True)
    placed = [jax.device_put(x, NamedSharding(mesh, P("data", "sp"))) for x in (q, k, v)]
    with jax.set_mesh(mesh):
        out = ring_attn.dot_product_attention(*placed, is_causal=True, axis_name="sp")
    assert_close(out, expected, name="out")
    assert tuple(out.sharding.spec[:2]) == ("data", "sp")


def test_explicit_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "sp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    q, k, v, d_out = random_qkv(4, 2, 32, 4, 4, 16)
    expected, expected_grads = jax_nn_in_float64(q, k, v, d_out, is_causal=True)
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, P("data", "sp")) for x in (q, k, v, d_out)]
        fn = lambda q, k, v: ring_attn.dot_product_attention(q, k, v, is_causal=True, axis_name="sp")  # noqa: E731
        out, grads = output_and_grads(fn, *placed)
    assert_close(out, expected, name="out")
    for grad_name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=grad_name)


def test_unbatched_and_one_device():
    q, k, v, _ = random_qkv(5, 1, 24, 4, 2, 16)
    expected, _ = jax_nn_in_float64(q[0], k[0], v[0], q[0], is_causal=True, local_window_size=(4, 0))
    out = ring_attn.dot_product_attention(q[0], k[0], v[0], is_causal=True, local_window_size=(4, 0))
    assert out.shape == q[0].shape
    assert_close(out, expected, name="out")
    with jax.set_mesh(data_sequence_mesh()):
        out = ring_attn.dot_product_attention(q[0], k[0], v[0], is_causal=True, local_window_size=4, axis_name="sp")
    assert_close(out, expected, name="out")


def test_pallas_kernels_in_the_ring():
    q, k, v, d_out = random_qkv(6, 2, 32, 4, 2, 16)
    kwargs = dict(is_causal=True, key_value_seq_lengths=lengths(32, 21))
    expected, expected_grads = jax_nn_in_float64(q, k, v, d_out, **kwargs)
    with jax.set_mesh(data_sequence_mesh()):
        fn = lambda q, k, v: ring_attn.dot_product_attention(  # noqa: E731
            q, k, v, implementation="pallas_triton", axis_name="sp", **kwargs
        )
        out, grads = output_and_grads(fn, q, k, v, d_out)
    assert_close(out, expected, name="out")
    for grad_name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=grad_name)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bias=jnp.ones((1, 1, 8, 8))), NotImplementedError, "bias: a dense"),
        (dict(mask=jnp.ones((1, 1, 8, 8), bool)), NotImplementedError, "mask: a dense"),
        (dict(return_residual=True), NotImplementedError, "return_residual"),
        (dict(implementation="cudnn"), NotImplementedError, "implementation='cudnn'"),
        (dict(implementation="fast"), ValueError, "unknown implementation='fast'"),
        (dict(local_window_size=(3, 1)), NotImplementedError, r"local_window_size=\(3, 1\)"),
        (dict(local_window_size=(0, 2)), NotImplementedError, r"local_window_size=\(0, 2\)"),
        (dict(local_window_size=-1), ValueError, "local_window_size must be a non-negative int"),
        (dict(key_value_seq_lengths=jnp.ones((3,), jnp.int32)), ValueError,
         r"key_value_seq_lengths must have shape \[B\] = \(2,\), got \(3,\)"),
        (dict(query_seq_lengths=jnp.ones((2,))), ValueError,
         "query_seq_lengths must have an integer dtype, got float32"),
        (dict(axis_name="seq"), ValueError, "axis_name='seq' is not an axis of the mesh"),
    ],
)
def test_unsupported_and_bad_arguments_raise(kwargs, error, match):
    q, k, v, _ = random_qkv(7, 2, 8, 4, 4, 16)
    kwargs = {"axis_name": "sp", **kwargs}
    with jax.set_mesh(data_sequence_mesh()), pytest.raises(error, match=match):
        ring_attn.dot_product_attention(q, k, v, **kwargs)


def test_axis_name_needs_a_mesh():
    q, k, v, _ = random_qkv(8, 2, 8, 4, 4, 16)
    with pytest.raises(ValueError, match="there is none: call inside `with jax.set_mesh"):
        ring_attn.dot_product_attention(q, k, v, axis_name="sp")
