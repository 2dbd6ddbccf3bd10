"""Flax layers: interop with flax.linen, sown weights, basic attention, ViT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab import layers
from attention_lab import models
from attention_lab.kernels import softmax
from attention_lab.layers import recurrent_attention
from conftest import numpy_self_attention

X = jax.random.normal(jax.random.key(0), (2, 5, 16))
# Kernels that run on this backend and take dense masks (what Flax passes).
MASKABLE = [n for n in kernels.names()
            if jax.default_backend() in kernels.get(n).platforms and kernels.get(n).supports("mask")]
VALID = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("name", MASKABLE)
def test_attention_fn_matches_flax_attention_with_masks(name):
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=kernels.attention_fn(name))
  params = flax_mha.init(jax.random.key(1), X)
  key_padding = nn.make_attention_mask(jnp.ones_like(VALID), VALID)        # float 0/1
  causal_and_padding = nn.combine_masks(key_padding, nn.make_causal_mask(VALID))
  for mask in (None, key_padding, causal_and_padding, key_padding.astype(bool)):
    np.testing.assert_allclose(ours.apply(params, X, mask=mask),
                               flax_mha.apply(params, X, mask=mask), rtol=1e-5, atol=1e-5)
  # With query padding some rows have no key: Flax averages the values there,
  # the contract returns zeros. Rows with a key agree.
  both = nn.make_attention_mask(VALID, VALID)
  got, want = ours.apply(params, X, mask=both), flax_mha.apply(params, X, mask=both)
  np.testing.assert_allclose(got[0, :3], want[0, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_attention_fn_sows_weights_through_flax():
  mha = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=kernels.attention_fn("jax_nn"))
  params = mha.init(jax.random.key(1), X)
  _, state = mha.apply(params, X, sow_weights=True, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (2, 4, 5, 5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_attention_fn_passes_flax_dropout():
  mha = nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.5,
                                        attention_fn=kernels.attention_fn(None))
  params = mha.init(jax.random.key(1), X, deterministic=True)
  a = mha.apply(params, X, deterministic=False, rngs={"dropout": jax.random.key(2)})
  b = mha.apply(params, X, deterministic=True)
  assert not np.allclose(a, b)


def test_our_multi_head_attention_equals_flax_with_the_same_parameters():
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4)
  params = flax_mha.init(jax.random.key(1), X)
  mask = nn.make_attention_mask(jnp.ones_like(VALID), VALID)
  for name in MASKABLE:
    ours = layers.MultiHeadAttention(num_heads=4, attention=layers.AttentionConfig(kernel=name))
    np.testing.assert_allclose(ours.apply(params, X, mask=mask),
                               flax_mha.apply(params, X, mask=mask), rtol=1e-5, atol=1e-5)


# The kernels that run on CPU, each with the call forms it declares (pallas
# takes neither dense masks nor bias; on CPU it runs interpreted).
RUNNABLE = ["reference", "jax_nn", "blockwise", "pallas"]
BIAS = jnp.asarray(np.random.default_rng(7).normal(size=(2, 4, 5, 5)), jnp.float32)
FORMS = {
    "plain": ({}, set()),
    "padding_mask": ({"mask": nn.make_attention_mask(VALID, VALID).astype(bool)}, {"mask"}),
    "bias": ({"bias": BIAS}, {"bias"}),
    "mask_and_bias": ({"mask": nn.make_attention_mask(jnp.ones_like(VALID), VALID).astype(bool),
                       "bias": BIAS}, {"mask", "bias"}),
    "causal": ({}, {"causal"}),
}


@pytest.mark.parametrize("name,form", [
    (name, form) for name in RUNNABLE for form in sorted(FORMS)
    if FORMS[form][1] <= kernels.get(name).features])
def test_layer_output_equals_float64_numpy_with_every_kernel(name, form):
  """Every kernel, through the layer, gives the float64 layer's output; the
  weights sown for pictures are that softmax too, whichever kernel ran."""
  kwargs, needs = FORMS[form]
  is_causal = "causal" in needs
  module = layers.SelfAttention(num_heads=4, attention=layers.AttentionConfig(kernel=name),
                                is_causal=is_causal)
  params = module.init(jax.random.key(3), X)
  want_out, want_weights = numpy_self_attention(params["params"], X, is_causal=is_causal,
                                                **kwargs)
  out, state = module.apply(params, X, mutable=["intermediates"], **kwargs)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (2, 4, 5, 5)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
  if form == "padding_mask":
    assert np.all(np.asarray(weights[0, :, 3:]) == 0.0)   # padded queries attend nowhere
    np.testing.assert_allclose(out[0, 3:], np.broadcast_to(params["params"]["out"]["bias"], (2, 16)),
                               rtol=1e-6, atol=1e-6)      # zero context: the output bias alone


LENGTHS = VALID.sum(-1).astype(jnp.int32)                # [3, 5]: trailing padding
KEY_PADDING = VALID.astype(bool)[:, None, None, :]


@pytest.mark.parametrize("name", RUNNABLE)
def test_kv_lengths_equal_the_dense_key_padding_mask(name):
  """``kv_lengths`` is the key padding mask ``valid[:, None, None, :]`` in
  another form (one the fused kernels take): same output, padded query rows
  included, and the same sown weights; ``q_lengths`` then zeroes only the
  padded rows' attention and their weight rows."""
  module = layers.SelfAttention(num_heads=4, attention=layers.AttentionConfig(kernel=name))
  params = module.init(jax.random.key(3), X)
  dense = layers.SelfAttention(num_heads=4, attention=layers.AttentionConfig(kernel="reference"))
  want, want_state = dense.apply(params, X, mask=KEY_PADDING, mutable=["intermediates"])
  got, state = module.apply(params, X, kv_lengths=LENGTHS, mutable=["intermediates"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  (weights,), (want_weights,) = (s["intermediates"]["attention_weights"]
                                 for s in (state, want_state))
  np.testing.assert_allclose(weights, want_weights, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(weights[0, :, :, 3:]) == 0.0)   # padded keys get no weight
  assert np.all(np.asarray(weights[0, :, 3:]).sum(-1) > 0.99)   # padded rows still attend

  rows, state = module.apply(params, X, q_lengths=LENGTHS, kv_lengths=LENGTHS,
                             mutable=["intermediates"])
  np.testing.assert_allclose(rows[1], got[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rows[0, :3], got[0, :3], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rows[0, 3:], np.broadcast_to(params["params"]["out"]["bias"], (2, 16)),
                             rtol=1e-6, atol=1e-6)    # zero context: the output bias alone
  (weights,) = state["intermediates"]["attention_weights"]
  assert np.all(np.asarray(weights[0, :, 3:]) == 0.0)


@pytest.mark.parametrize("name", MASKABLE)
def test_an_explicit_mask_still_works_beside_kv_lengths(name):
  """A mask that lengths cannot express (a hole mid-sequence) is still taken,
  and combines with ``kv_lengths`` as the logical AND of the two masks."""
  hole = jnp.array([True, False, True, True, True])[None, None, None, :]
  module = layers.SelfAttention(num_heads=4, attention=layers.AttentionConfig(kernel=name))
  params = module.init(jax.random.key(3), X)
  want = layers.SelfAttention(num_heads=4, attention=layers.AttentionConfig(kernel="reference")).apply(
      params, X, mask=hole & KEY_PADDING)
  np.testing.assert_allclose(module.apply(params, X, mask=hole, kv_lengths=LENGTHS), want,
                             rtol=1e-5, atol=1e-5)


def test_encoder_passes_lengths_to_every_block():
  encoder = layers.Encoder(num_layers=2, num_heads=4, mlp_dim=32)
  params = encoder.init(jax.random.key(0), X)
  np.testing.assert_allclose(encoder.apply(params, X, kv_lengths=LENGTHS),
                             encoder.apply(params, X, mask=KEY_PADDING), rtol=1e-5, atol=1e-5)
  assert not np.allclose(encoder.apply(params, X)[0], encoder.apply(params, X, mask=KEY_PADDING)[0])
  # q_lengths reaches the blocks too: padded rows change, valid rows do not.
  both = encoder.apply(params, X, q_lengths=LENGTHS, kv_lengths=LENGTHS)
  np.testing.assert_allclose(both[0, :3], encoder.apply(params, X, kv_lengths=LENGTHS)[0, :3],
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(both[0, 3:], encoder.apply(params, X, kv_lengths=LENGTHS)[0, 3:])


def test_cross_attention_shapes_and_heads_check():
  ctx = jax.random.normal(jax.random.key(4), (2, 3, 8))
  cross = layers.CrossAttention(num_heads=2, qkv_features=8)
  params = cross.init(jax.random.key(5), X, ctx)
  assert cross.apply(params, X, ctx).shape == (2, 5, 16)
  with pytest.raises(ValueError, match="not divisible by num_heads 3"):
    layers.SelfAttention(num_heads=3).init(jax.random.key(0), X)


def test_multi_head_attention_unknown_kernel():
  with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
    layers.SelfAttention(num_heads=4, attention=layers.AttentionConfig(kernel="nope")).init(
        jax.random.key(0), X)


def test_scores_match_their_formulas():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4))
  w, wq, wk, v, b = (rng.normal(size=s) for s in ((4, 4), (4, 6), (4, 6), (6,), (6,)))
  np.testing.assert_allclose(recurrent_attention.dot_scores(q, k), q @ k.transpose(0, 2, 1), rtol=1e-5)
  np.testing.assert_allclose(recurrent_attention.scaled_dot_scores(q, k), q @ k.transpose(0, 2, 1) / 2, rtol=1e-5)
  np.testing.assert_allclose(recurrent_attention.general_scores(q, k, w), q @ w @ k.transpose(0, 2, 1), rtol=1e-5)
  want = np.array([[[v @ np.tanh(wq.T @ q[n, i] + wk.T @ k[n, j] + b) for j in range(5)]
                    for i in range(3)] for n in range(2)])
  np.testing.assert_allclose(recurrent_attention.additive_scores(q, k, wq, wk, v, b), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="weight shape"):
    recurrent_attention.general_scores(q, k, np.ones((3, 4)))
  with pytest.raises(ValueError, match="query features 4 != key features 3"):
    recurrent_attention.dot_scores(q, k[..., :3])


def test_masked_softmax_edges():
  logits = jnp.array([[1.0, 1e30, 2.0], [5.0, 6.0, 7.0]], jnp.bfloat16)
  mask = jnp.array([[True, False, True], [False, False, False]])
  w = softmax.masked_softmax(logits, mask)
  assert w.dtype == jnp.float32
  np.testing.assert_allclose(w[0], [np.exp(-1) / (1 + np.exp(-1)), 0, 1 / (1 + np.exp(-1))], rtol=1e-2)
  np.testing.assert_array_equal(w[1], [0, 0, 0])
  grad = jax.grad(lambda x: softmax.masked_softmax(x, mask)[0, 0])(logits.astype(jnp.float32))
  assert np.all(np.isfinite(grad)) and grad[0, 1] == 0


@pytest.mark.parametrize("module", [
    layers.AdditiveAttention(units=8), layers.LuongAttention(score="dot"),
    layers.LuongAttention(score="general")])
def test_basic_attention_masks_and_normalises(module):
  query = X[:, 0]                                           # [batch, features]
  mask = VALID.astype(bool)
  params = module.init(jax.random.key(0), query, X, mask=mask)
  (context, weights), state = module.apply(params, query, X, mask=mask, mutable=["intermediates"])
  assert context.shape == (2, 16) and weights.shape == (2, 5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.asarray(weights[0, 3:]) == 0)
  np.testing.assert_allclose(context[0], (weights[0, :, None] * X[0]).sum(0), rtol=1e-5, atol=1e-5)
  assert "attention_weights" in state["intermediates"]
  # Several queries at once (the teacher-forced decoder case).
  ctx_many, w_many = module.apply(params, X[:, :3], X, mask=mask)
  assert ctx_many.shape == (2, 3, 16) and w_many.shape == (2, 3, 5)


def test_luong_unknown_score():
  with pytest.raises(ValueError, match="unknown score 'cosine'"):
    layers.LuongAttention(score="cosine").init(jax.random.key(0), X[:, 0], X)


def test_attention_pooling():
  pool = layers.AttentionPooling(units=8)
  params = pool.init(jax.random.key(0), X)
  pooled, weights = pool.apply(params, X, mask=VALID.astype(bool))
  assert pooled.shape == (2, 16)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.asarray(weights[0, 3:]) == 0)
  np.testing.assert_allclose(pooled[0], (weights[0, :, None] * X[0]).sum(0), rtol=1e-5, atol=1e-5)


def test_encoder_and_sinusoids():
  enc = layers.Encoder(num_layers=2, num_heads=4, mlp_dim=32, dropout_rate=0.1)
  params = enc.init(jax.random.key(0), X)
  out = enc.apply(params, X, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert out.shape == X.shape
  table = layers.sinusoidal_positions(10, 6)
  assert table.shape == (10, 6)
  np.testing.assert_allclose(table[0], [0, 1, 0, 1, 0, 1], atol=1e-6)


def test_vit_builds_from_config_and_checks_inputs():
  config = {"name": "vit", "num_classes": 10, "patch_size": 7, "hidden_dim": 16,
            "num_layers": 1, "num_heads": 2, "mlp_dim": 16, "attention": {"kernel": "reference"}}
  model = models.build(config)
  images = jnp.zeros((3, 28, 28, 1))
  params = model.init(jax.random.key(0), images)
  assert model.apply(params, images).shape == (3, 10)
  _, state = model.apply(params, images, mutable=["intermediates"])
  (w,) = jax.tree_util.tree_leaves(state)
  assert w.shape == (3, 2, 17, 17)                    # 16 patches + CLS
  with pytest.raises(ValueError, match="not divisible by patch_size 7"):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 1)))
  with pytest.raises(ValueError, match=r"has no field\(s\) \['depth'\]"):
    models.build({**config, "depth": 3})
  with pytest.raises(ValueError, match="unknown model 'resnet9'"):
    models.build({**config, "name": "resnet9"})


def test_vit_conv_stem_reaches_the_same_patch_grid():
  config = {"name": "vit", "num_classes": 10, "patch_size": 4, "hidden_dim": 16,
            "num_layers": 1, "num_heads": 2, "mlp_dim": 16, "stem": "conv"}
  model = models.build(config)
  images = jnp.zeros((2, 28, 28, 1))
  params = model.init(jax.random.key(0), images)
  _, state = model.apply(params, images, mutable=["intermediates"])
  (w,) = jax.tree_util.tree_leaves(state)
  assert w.shape == (2, 2, 50, 50)                    # 7x7 patches + CLS
  assert {"stem_conv_0", "stem_conv_1", "patch_embedding"} <= set(params["params"])
  with pytest.raises(ValueError, match="power-of-two patch_size"):
    models.build({**config, "patch_size": 7}).init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="unknown stem 'fft'"):
    models.build({**config, "stem": "fft"}).init(jax.random.key(0), images)
