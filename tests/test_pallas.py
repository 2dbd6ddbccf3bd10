"""The Pallas kernel's own options, run in Pallas's interpreter on CPU.

(Agreement with the float64 reference for plain, causal, windowed, grouped-
query and odd-length attention in float32 and bfloat16 is in test_kernels.py,
with every kernel; on CPU the Pallas kernel runs there interpreted.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import masks
from attention_lab.kernels.pallas import pallas_attention


def _inputs(seed, q_len, kv_len, batch=2, heads=2, dim=8):
  rng = np.random.default_rng(seed)
  make = lambda length: jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
  return make(q_len), make(kv_len), make(kv_len)


@pytest.mark.parametrize("form", [{}, {"is_causal": True}, {"local_window_size": (4, 2)}])
def test_kv_lengths_and_small_blocks_match_reference(form):
  q, k, v = _inputs(0, 40, 45)
  kv_lengths = jnp.array([45, 7])
  dense = masks.key_padding_mask(kv_lengths, 45)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  f = lambda q, k, v: pallas_attention(q, k, v, kv_lengths=kv_lengths, block_q=16,
                                       block_k=16, interpret=True, **form)
  g = lambda q, k, v: kernels.reference_attention(q, k, v, mask=dense, **form)
  np.testing.assert_allclose(f(q, k, v), g(q, k, v), rtol=2e-5, atol=2e-5)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: jnp.sum(g(*a) * cot), (0, 1, 2))(q, k, v)
  for a, b in zip(grads, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bad_options():
  q, k, v = _inputs(2, 16, 16)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    pallas_attention(q, k, v, block_q=48)
  with pytest.raises(ValueError, match=r"kv_lengths shape \(3,\) must equal"):
    pallas_attention(q, k, v, kv_lengths=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="'pallas' does not support bias"):
    pallas_attention(q, k, v, bias=jnp.zeros((16, 16)))
