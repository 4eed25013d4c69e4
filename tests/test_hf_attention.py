"""Soft-cap and sinks against transformers' own attention: Gemma 2's logit soft-cap and gpt-oss's
sinks, forward and gradients (the sinks' included), on a ring of 4.

Whole Gemma 2 and gpt-oss checkpoints are other architectures than the LLaMA this model zoo
implements (Gemma 2: pre- and post-norms, GeGLU, a final logit cap, alternating local layers;
gpt-oss: mixture-of-experts feedforward, attention biases, YaRN rotary), so the parity checked here
is the attention these options change, through the functions those models call.
"""

import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from conftest import assert_close, random_qkv, ring_mesh

import ring_attn

torch = pytest.importorskip("torch", reason="Hugging Face parity needs torch: pip install torch transformers")
pytest.importorskip("transformers", reason="Hugging Face parity needs transformers")

B, L, N, K, H = 2, 64, 4, 2, 32
SCALE = H**-0.5


def _torch(x):
    """[B, L, heads, H] -> torch [B, heads, L, H], float64 for an exact reference."""
    return torch.tensor(np.asarray(x, np.float64)).transpose(1, 2).contiguous().requires_grad_(True)


def _causal_mask():
    return torch.full((L, L), -torch.inf, dtype=torch.float64).triu(1)[None, None]


def _ours(q, k, v, d_out, sinks=None, **options):
    fn = functools.partial(ring_attn.ring_attention_global, mesh=ring_mesh(4), axis_name="sp", causal=True,
                           layout="zigzag", **options)
    args = (q, k, v) if sinks is None else (q, k, v, sinks)
    out, vjp = jax.vjp(lambda *a: fn(*a[:3], sinks=None if sinks is None else a[3]), *args)
    return out, vjp(d_out)


def _theirs(attend, q, k, v, d_out, sinks=None):
    tq, tk, tv = _torch(q), _torch(k), _torch(v)
    module = SimpleNamespace(num_key_value_groups=N // K, training=False, head_dim=H)
    leaves = [tq, tk, tv]
    if sinks is not None:
        module.sinks = torch.tensor(np.asarray(sinks, np.float64), requires_grad=True)
        leaves.append(module.sinks)
    out, _ = attend(module, tq, tk, tv, _causal_mask())  # [B, L, N, H]
    out.backward(torch.tensor(np.asarray(d_out, np.float64)))
    grads = [x.grad.transpose(1, 2).numpy() if x.ndim == 4 else x.grad.numpy() for x in leaves]
    return out.detach().numpy(), grads


def test_soft_cap_matches_gemma2():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v, d_out = random_qkv(1, B, L, N, K, H)
    q, k = 3.0 * q, 3.0 * k  # most scores past the cap
    attend = functools.partial(eager_attention_forward, scaling=SCALE, softcap=5.0)
    expected, expected_grads = _theirs(attend, q, k, v, d_out)
    out, grads = _ours(q, k, v, d_out, logit_soft_cap=5.0)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)


def test_sinks_match_gpt_oss():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v, d_out = random_qkv(2, B, L, N, K, H)
    sinks = jax.numpy.asarray(np.random.default_rng(3).normal(1.0, 1.5, N), jax.numpy.float32)
    attend = functools.partial(eager_attention_forward, scaling=SCALE)
    expected, expected_grads = _theirs(attend, q, k, v, d_out, sinks)
    out, grads = _ours(q, k, v, d_out, sinks)
    assert_close(out, expected, name="out")
    for name, g, e in zip(("dq", "dk", "dv", "dsinks"), grads, expected_grads):
        assert_close(g, e, kind="gradient", name=name)
