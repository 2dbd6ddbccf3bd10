"""Text and seq2seq models: padding never leaks into a result, the decoder is
causal under teacher forcing, greedy decoding ignores the target and stops at
``<eos>``, and the seq2seq metrics score what they claim."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from attention_lab.layers import AttentionConfig
from attention_lab.layers import Encoder
from attention_lab.models.seq2seq import SCORES
from attention_lab.models.seq2seq import BOS_ID
from attention_lab.models.seq2seq import EOS_ID
from attention_lab.models.seq2seq import PAD_ID
from attention_lab.models.seq2seq import Seq2Seq
from attention_lab.models.seq2seq import strip_at_eos
from attention_lab.models.text import RnnAttentionClassifier
from attention_lab.models.text import TextTransformer
from attention_lab.train import tasks

TOKENS = jnp.array([[3, 4, 5, 6, 0, 0, 0], [7, 8, 9, 10, 11, 12, 13], [5, 0, 0, 0, 0, 0, 0]])


def _noise(shape, seed=7):
  """A random shift (a constant one would vanish in LayerNorm)."""
  return 3.0 * jax.random.normal(jax.random.key(seed), shape)


def _perturb(params, path, fn):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat[path] = fn(flat[path])
  return flax.traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_transformer_ignores_padding(pool):
  model = TextTransformer(num_classes=5, vocab_size=16, hidden_dim=16, num_layers=2,
                          num_heads=2, mlp_dim=32, pool=pool,
                          attention=AttentionConfig(kernel="reference"))
  params = model.init(jax.random.key(0), TOKENS)["params"]
  params = _perturb(params, ("head", "kernel"),
                    lambda k: jax.random.normal(jax.random.key(1), k.shape))
  logits = model.apply({"params": params}, TOKENS)
  # The padding embedding cannot change any logits, nor the position rows
  # past an example's end its logits (examples 0 and 2 end before the last 3).
  changed = _perturb(params, ("token_embedding", "embedding"), lambda e: e.at[0].add(_noise(e.shape[1:])))
  np.testing.assert_allclose(model.apply({"params": changed}, TOKENS), logits,
                             rtol=1e-5, atol=1e-5)
  changed = _perturb(params, ("position_embedding", "embedding"),
                     lambda e: e.at[-3:].add(_noise(e[-3:].shape)))
  np.testing.assert_allclose(model.apply({"params": changed}, TOKENS)[::2], logits[::2],
                             rtol=1e-5, atol=1e-5)
  # ...while a real token does.
  moved = _perturb(params, ("token_embedding", "embedding"), lambda e: e.at[3].add(_noise(e.shape[1:])))
  assert not np.allclose(model.apply({"params": moved}, TOKENS)[0], logits[0], atol=1e-4)


def test_text_transformer_same_logits_with_every_kernel():
  model = TextTransformer(num_classes=5, vocab_size=16, hidden_dim=16, num_layers=1,
                          num_heads=2, mlp_dim=32,
                          attention=AttentionConfig(kernel="reference"))
  params = model.init(jax.random.key(0), TOKENS)["params"]
  params = _perturb(params, ("head", "kernel"),
                    lambda k: jax.random.normal(jax.random.key(1), k.shape))
  want = model.apply({"params": params}, TOKENS)
  fast = model.clone(attention=AttentionConfig(kernel="blockwise"))
  np.testing.assert_allclose(fast.apply({"params": params}, TOKENS), want, rtol=1e-4,
                             atol=1e-5)


def _dense_key_padding(valid):
  """A Flax interceptor that runs every ``Encoder`` with the dense key padding
  mask ``valid[:, None, None, :]`` instead of lengths: how the classifier
  passed padding before it passed ``kv_lengths``."""
  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, Encoder) and context.method_name == "__call__":
      kwargs = dict(kwargs, kv_lengths=None, q_lengths=None, mask=valid[:, None, None, :])
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(interceptor)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("kernel", [None, "reference", "cpu=blockwise"])
def test_text_transformer_padding_as_lengths_equals_the_dense_mask(pool, kernel):
  """Padding travels to attention as lengths (which the fused kernels take):
  logits and the sown weights of the pictures equal the dense-mask model's."""
  model = TextTransformer(num_classes=5, vocab_size=16, hidden_dim=16, num_layers=2,
                          num_heads=2, mlp_dim=32, pool=pool,
                          attention=AttentionConfig(kernel=kernel))
  params = model.init(jax.random.key(0), TOKENS)["params"]
  params = _perturb(params, ("head", "kernel"),
                    lambda k: jax.random.normal(jax.random.key(1), k.shape))
  valid = TOKENS != 0
  if pool == "cls":
    valid = jnp.concatenate([jnp.ones((len(TOKENS), 1), bool), valid], axis=1)
  got, state = model.apply({"params": params}, TOKENS, mutable=["intermediates"])
  with _dense_key_padding(valid):
    want, want_state = model.apply({"params": params}, TOKENS, mutable=["intermediates"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Each block's sown attention_weights: what the pictures draw.
  weights, want_weights = (jax.tree_util.tree_leaves(s["intermediates"])
                           for s in (state, want_state))
  assert len(weights) == 2
  for w, v in zip(weights, want_weights):
    np.testing.assert_allclose(w, v, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(w)[2, :, :, valid[2].sum():] == 0.0)   # padding masked


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_attention_pooling_ignores_padding(cell):
  model = RnnAttentionClassifier(num_classes=5, vocab_size=16, embed_dim=8, hidden_dim=8,
                                 attention_units=8, cell=cell)
  params = model.init(jax.random.key(0), TOKENS)["params"]
  logits, state = model.apply({"params": params}, TOKENS, mutable=["intermediates"])
  weights = np.asarray(state["intermediates"]["pooling"]["attention_weights"][0])[:, 0]
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert np.all(weights[np.asarray(TOKENS) == 0] == 0.0)
  changed = _perturb(params, ("token_embedding", "embedding"), lambda e: e.at[0].add(_noise(e.shape[1:])))
  np.testing.assert_allclose(model.apply({"params": changed}, TOKENS), logits, rtol=1e-5,
                             atol=1e-6)


def test_text_models_reject_float_inputs():
  model = TextTransformer(num_classes=2, vocab_size=16, hidden_dim=8, num_layers=1,
                          num_heads=1, mlp_dim=8)
  with pytest.raises(ValueError, match="int token ids"):
    model.init(jax.random.key(0), jnp.ones((2, 5)))


SOURCE = jnp.array([[5, 6, 7, 8, 9, 0, 0], [10, 11, 12, 13, 14, 15, 16]])
TARGET = jnp.array([[5, 6, 7, 2, 0], [8, 9, 10, 11, 2]])


def _seq2seq(attention, cell="gru"):
  model = Seq2Seq(vocab_size=20, target_length=5, score=attention, embed_dim=8,
                  hidden_dim=8, attention_units=8, cell=cell)
  inputs = {"source": SOURCE, "target": TARGET}
  return model, model.init(jax.random.key(0), inputs)["params"], inputs


@pytest.mark.parametrize("attention,cell", [(a, c) for a in SCORES for c in ("gru", "lstm")])
def test_teacher_forcing_is_causal(attention, cell):
  model, params, inputs = _seq2seq(attention, cell)
  logits = model.apply({"params": params}, inputs, train=True)["logits"]
  changed = {"source": SOURCE, "target": TARGET.at[:, 2].set(13)}
  other = model.apply({"params": params}, changed, train=True)["logits"]
  # Step t reads the target up to t - 1: steps 0..2 are unchanged, step 3 moves.
  np.testing.assert_allclose(other[:, :3], logits[:, :3], rtol=1e-6)
  assert not np.allclose(other[:, 3], logits[:, 3])


@pytest.mark.parametrize("attention,cell", [("bahdanau", "gru"), ("luong_dot", "lstm"),
                                            ("luong_general", "gru")])
def test_greedy_decoding_ignores_target_and_stops_at_eos(attention, cell):
  model, params, inputs = _seq2seq(attention, cell)
  # Make <eos> likely after a few steps so the stop is exercised.
  params = _perturb(params, ("decoder", "output", "bias"), lambda b: b.at[EOS_ID].add(2.0))
  outputs, state = model.apply({"params": params}, inputs, train=False,
                               mutable=["intermediates"])
  other, other_state = model.apply(
      {"params": params}, {"source": SOURCE, "target": jnp.zeros_like(TARGET)},
      mutable=["intermediates"])
  np.testing.assert_array_equal(other["tokens"], outputs["tokens"])
  np.testing.assert_array_equal(other_state["intermediates"]["alignment"][0],
                                state["intermediates"]["alignment"][0])
  tokens = np.asarray(outputs["tokens"])
  for row in tokens:
    ends = np.flatnonzero(row == EOS_ID)
    assert len(ends), row
    assert np.all(row[ends[0] + 1:] == PAD_ID)      # nothing written after <eos>
    assert strip_at_eos(row) == [t for t in row[:ends[0]] if t not in (PAD_ID, BOS_ID)]
  alignment = np.asarray(state["intermediates"]["alignment"][0])
  assert alignment.shape == (2, 5, 7)
  np.testing.assert_allclose(alignment.sum(-1), 1.0, rtol=1e-5)
  assert np.all(alignment[0, :, 5:] == 0.0)           # source padding gets no attention
  # The evaluation loss is the teacher-forced one: an early <eos> does not
  # inflate it (the scored tokens are wrong, the loss stays a cross-entropy).
  sums = tasks.get("seq2seq").eval_sums(outputs, {"label": TARGET, "weight": jnp.ones(2)})
  assert 0.0 < float(sums["loss"]) / 2 < 2 * np.log(20)
  assert float(sums["exact_match"]) == 0.0


def test_seq2seq_rejects_bad_attention_and_shapes():
  model, params, inputs = _seq2seq("bahdanau")
  with pytest.raises(ValueError, match="unknown score"):
    model.clone(score="cosine").init(jax.random.key(0), inputs)
  with pytest.raises(ValueError, match="target"):
    model.apply({"params": params}, {"source": SOURCE, "target": TARGET[:, :3]})


def test_seq2seq_metrics():
  targets = jnp.array([[5, 6, EOS_ID, 0], [7, 8, EOS_ID, 0], [9, 9, 9, EOS_ID]])
  # Example 0 exact (what follows <eos> is not scored), 1 wrong in one token,
  # 2 misses its <eos>.
  tokens = jnp.array([[5, 6, EOS_ID, 4], [7, 3, EOS_ID, 0], [9, 9, 9, 9]])
  logits = jax.nn.one_hot(targets, 12) * 10.0        # teacher-forced: all right
  outputs = {"logits": logits, "tokens": tokens}
  task = tasks.get("seq2seq")
  sums = task.eval_sums(outputs, {"label": targets, "weight": jnp.ones(3)})
  assert float(sums["exact_match"]) == 1.0
  np.testing.assert_allclose(float(sums["token_accuracy"]), 1.0 + 2 / 3 + 3 / 4)
  assert float(sums["loss"]) < 0.01                  # three near-certain examples
  np.testing.assert_array_equal(task.predict(outputs), tokens)
  wrong = {"logits": jax.nn.one_hot(tokens, 12) * 10.0}
  loss, metrics = task.train_loss(wrong, {"label": targets},
                                  ConfigDict({"label_smoothing": 0.0}))
  np.testing.assert_allclose(float(metrics["token_accuracy"]), 8 / 10)
  assert np.isfinite(float(loss))
