"""Linear attention: a registered kernel whose function is not softmax.

It is checked against its own definition written out here in float64
(``phi(x) = elu(x) + 1``, weights ``phi(q_i) . phi(k_j)`` over the visible
keys, normalised per query), not against softmax; the registry's semantics
keep it out of automatic dispatch and give pictures its own weights.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import registry
from attention_lab.kernels.linear import linear_attention


def _phi(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _definition_weights(q, k, causal, kv_lengths):
  """float64 NumPy: ``[b, n, t, s]`` linear-attention weights."""
  heads = q.shape[2]
  k = np.repeat(k, heads // k.shape[2], axis=2)
  a = np.einsum("btnd,bsnd->bnts", _phi(q), _phi(k))
  t, s = a.shape[-2:]
  visible = np.ones((t, s), bool)
  if causal:
    visible = np.tril(visible)
  visible = visible[None, None] & (np.arange(s)[None, None, None, :]
                                   < np.asarray(kv_lengths)[:, None, None, None])
  a = np.where(visible, a, 0.0)
  total = a.sum(-1, keepdims=True)
  return np.where(total > 0, a / np.where(total > 0, total, 1.0), 0.0)


def _definition(q, k, v, causal, kv_lengths):
  w = _definition_weights(q, k, causal, kv_lengths)
  v = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnd->btnd", w, v)


def _jnp_definition(q, k, v, causal, kv_lengths):
  """The same formula in jax.numpy (float64 under x64), for reference gradients."""
  heads = q.shape[2]
  phi = lambda x: jax.nn.elu(x) + 1.0
  k = jnp.repeat(k, heads // k.shape[2], axis=2)
  v = jnp.repeat(v, heads // v.shape[2], axis=2)
  a = jnp.einsum("btnd,bsnd->bnts", phi(q), phi(k))
  t, s = a.shape[-2:]
  visible = jnp.tril(jnp.ones((t, s), bool)) if causal else jnp.ones((t, s), bool)
  visible = visible[None, None] & (jnp.arange(s)[None, None, None, :]
                                   < jnp.asarray(kv_lengths)[:, None, None, None])
  a = jnp.where(visible, a, 0.0)
  return jnp.einsum("bnts,bsnd->btnd", a / a.sum(-1, keepdims=True), v)


def _inputs(seed, t=150, heads=4, kv_heads=2, d=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, t, heads, d))
  k, v = (rng.normal(size=(2, t, kv_heads, d)) for _ in range(2))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_its_float64_definition_forward_and_gradients(causal):
  """Several chunks of the causal scan (150 tokens, chunks of 32), padded
  keys, 4 query heads over 2 K/V heads."""
  q, k, v = _inputs(0)
  kv_lengths = np.array([150, 70])
  f = lambda q, k, v: linear_attention(q, k, v, is_causal=causal,
                                       kv_lengths=jnp.asarray(kv_lengths), chunk=32)
  as64 = lambda x: np.asarray(x, np.float64)
  want = _definition(as64(q), as64(k), as64(v), causal, kv_lengths)
  np.testing.assert_allclose(f(q, k, v), want, rtol=2e-5, atol=2e-5)

  cot = np.random.default_rng(1).normal(size=q.shape)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    ref = lambda *a: jnp.sum(_jnp_definition(*a, causal, kv_lengths) * cot)
    want_grads = jax.grad(ref, (0, 1, 2))(*(jnp.asarray(as64(x)) for x in (q, k, v)))
  for which, g, w in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=1e-4, err_msg=which)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_half_precision_inputs_stay_close(dtype):
  """Half-precision inputs are computed in float32 and rounded once to the
  input dtype at the end: within one rounding (eps / 2 relative) of the
  float64 definition on the same (rounded) inputs. rtol is the dtype's eps
  (bf16 7.8e-3, f16 9.8e-4, twice that bound). phi and the sums computed in
  the input dtype miss it: up to 190x (bf16) and 300x (f16) eps relative,
  0.011 and 0.002 absolute, which the former atol of 3e-2 let through."""
  q, k, v = _inputs(2, t=64, dtype=dtype)
  got = linear_attention(q, k, v, is_causal=True, chunk=16)
  assert got.dtype == dtype
  as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  want = _definition(as64(q), as64(k), as64(v), True, [64, 64])
  eps, eps32 = float(jnp.finfo(dtype).eps), float(jnp.finfo(jnp.float32).eps)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=eps, atol=16 * eps32)


def test_pictures_get_the_linear_weights():
  q, k, _ = _inputs(3, t=20)
  lengths = np.array([20, 9])
  mask = kernels.masks.key_padding_mask(jnp.asarray(lengths), 20)
  got = kernels.attention_weights(q, k, None, mask, is_causal=True, implementation="linear")
  want = _definition_weights(np.asarray(q, np.float64), np.asarray(k, np.float64), True, lengths)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  softmax = kernels.attention_weights(q, k, None, mask, is_causal=True)
  assert not np.allclose(softmax, want, atol=1e-2)      # a different function


def test_dispatch_runs_it_only_when_named():
  q, k, v = _inputs(4, t=40)
  named = kernels.dot_product_attention(q, k, v, is_causal=True, implementation="linear")
  want = _definition(*(np.asarray(x, np.float64) for x in (q, k, v)), True, [40, 40])
  np.testing.assert_allclose(named, want, rtol=2e-5, atol=2e-5)
  for platform in registry.PLATFORMS:
    assert "linear" not in kernels.preference(platform)
  with pytest.raises(ValueError, match="automatic dispatch orders softmax kernels only"):
    registry.set_preference("cpu", ["linear", "reference"])
  with pytest.raises(ValueError, match="mixes attention functions"):
    kernels.dot_product_attention(q, k, v, implementation="cpu=linear")
  with pytest.raises(ValueError, match="needs weights= .* and automatic=False"):
    registry.register(registry.KernelSpec(name="mine", fn=linear_attention,
                                          features=frozenset(), semantics="mine"))


def test_bad_input_gets_one_line_naming_it():
  q, k, v = _inputs(5, t=16)
  with pytest.raises(ValueError, match="linear attention has no logit scale"):
    linear_attention(q, k, v, scale=0.1)
  with pytest.raises(ValueError, match="'linear' does not support mask"):
    linear_attention(q, k, v, mask=jnp.ones((16, 16), bool))
  with pytest.raises(ValueError, match="causal needs q_length == kv_length, got 8 and 16"):
    linear_attention(q[:, :8], k, v, is_causal=True)
  with pytest.raises(ValueError, match="attention kernel 'linear' does not support 'window'"):
    kernels.dot_product_attention(q, k, v, local_window_size=4, implementation="linear")
  from attention_lab.kernels.linear import linear_attention_weights
  with pytest.raises(ValueError, match="linear_attention_weights: .*head_dim differ"):
    linear_attention_weights(q, k[..., :3])
  with pytest.raises(ValueError, match="linear_attention_weights: mask .* broadcast"):
    linear_attention_weights(q, k, mask=jnp.ones((3, 16), bool))


def test_a_transformer_runs_it_from_the_config():
  """``config.model.attention.kernel = "linear"`` reaches the kernel: the text
  Transformer's loss and gradients are finite, and with the same parameters
  its gradients and sown weights differ from the softmax model's."""
  from attention_lab import models
  from experiments import get_config

  def build(kernel):
    model_config = get_config("imdb_bytes_transformer").model
    model_config.attention.kernel = kernel
    model_config.num_layers, model_config.hidden_dim, model_config.mlp_dim = 1, 16, 32
    model_config.dtype = "float32"
    return models.build(model_config)

  linear, softmax = build("linear"), build(None)
  tokens = jnp.asarray(np.random.default_rng(6).integers(3, 200, size=(2, 48)), jnp.int32)
  variables = linear.init(jax.random.key(0), tokens)
  apply = lambda model: model.apply(variables, tokens, mutable=["intermediates"])
  (logits, state), (_, state_softmax) = apply(linear), apply(softmax)
  grads = jax.grad(lambda p: linear.apply({"params": p}, tokens).sum())(variables["params"])
  assert np.all(np.isfinite(logits))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  weights = np.asarray(jax.tree.leaves(state["intermediates"])[0])
  weights_softmax = np.asarray(jax.tree.leaves(state_softmax["intermediates"])[0])
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(weights, weights_softmax, atol=1e-3)
  # The head starts at zero, so the kernel's output shows in the gradients.
  grads_softmax = jax.grad(lambda p: softmax.apply({"params": p}, tokens).sum())(
      variables["params"])
  assert not all(np.allclose(a, b, atol=1e-6) for a, b in
                 zip(jax.tree.leaves(grads), jax.tree.leaves(grads_softmax)))
