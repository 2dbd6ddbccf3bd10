"""Mixed precision (``config.model.dtype``): every model computes in the chosen
dtype while its parameters, the logits, the loss and the metrics stay float32.

"Computes in" is checked on the lowered program, not on a flag: every matrix
product and convolution of the forward pass (``dot_general`` and
``convolution`` in the StableHLO, scanned RNN steps and the attention kernel
included) must take bfloat16 operands, except the two that are float32 on
purpose: the logits and the speech front end's mel filterbank.
"""

import functools
import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import models
from attention_lab.layers import AttentionConfig

_PRODUCT = re.compile(r"stablehlo\.(dot_general|convolution)\b.*?: \(tensor<([^>]*)>, tensor<([^>]*)>\)")
_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}


def _products(fn, *args):
  """``(op, operand dtypes, operand shapes)`` of every matrix product and
  convolution in ``jax.jit(fn)`` lowered for this machine's platform.

  The lowered program, not the jaxpr: kernels dispatch per platform
  (``lax.platform_dependent``), so the jaxpr also holds the TPU and GPU
  branches, which lowering drops. Before XLA's optimisation, which on a CPU
  may widen bfloat16 products to float32 to run them.
  """
  found = []
  for match in _PRODUCT.finditer(jax.jit(fn).lower(*args).as_text()):
    op, operands = match.group(1), match.group(2, 3)
    parsed = [t.split("x") for t in operands]
    found.append((op, tuple(_DTYPES.get(p[-1], p[-1]) for p in parsed),
                  tuple(tuple(int(d) for d in p[:-1]) for p in parsed)))
  return found


def _float32_on_purpose(shapes, num_outputs, num_mels=None):
  """A product with the logits (an operand whose last axis is the
  ``num_outputs`` classes or tokens: the head, forward or backward) or the
  mel filterbank (``[..., 257 FFT bins] x [257, num_mels]``)."""
  return (any(shape[-1:] == (num_outputs,) for shape in shapes)
          or (num_mels is not None and shapes[-1] == (257, num_mels)))


def _assert_computes_in_bfloat16(products, num_outputs, num_mels=None, mixed_ok=False):
  """Every product takes bfloat16 operands, or is float32 on purpose.

  ``mixed_ok``: float32 x bfloat16 products are allowed too (a backward
  pass: the softmax runs in float32, so its cotangent meets bfloat16 values
  inside the attention kernel's gradient).
  """
  assert products, "no matrix product traced"
  wrong = [p for p in products if p[1] != ("bfloat16", "bfloat16")
           and not (p[1] == ("float32", "float32")
                    and _float32_on_purpose(p[2], num_outputs, num_mels))
           and not (mixed_ok and set(p[1]) == {"float32", "bfloat16"})]
  assert not wrong, f"products not in bfloat16: {wrong}"
  in_bf16 = [p for p in products if p[1] == ("bfloat16", "bfloat16")]
  assert len(in_bf16) >= len(products) // 2, products


_TOKENS = np.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]], np.int32)
_RNG = np.random.default_rng(0)
_IMAGES = _RNG.random((2, 28, 28, 1), np.float32)
_CLIPS = (_RNG.standard_normal((2, 16000)) * 2000).astype(np.int16)
_VIDEO = _RNG.random((2, 4, 16, 16, 1), np.float32)     # 2 clips of 4 frames
_SCENES = {"image": _IMAGES[:, :16, :16], "target": _TOKENS[:, :5]}
_ENCODER = dict(hidden_dim=16, num_layers=2, num_heads=2, mlp_dim=32)
# name -> (model fields, inputs, logits width); small, but every kind of layer
# each family has (conv stem, CBAM, LSTM + Luong, Conformer convolution...).
FAMILIES = {
    "vit": (dict(num_classes=10, patch_size=4, stem="conv", **_ENCODER), _IMAGES, 10),
    "pixel_transformer": (dict(num_classes=10, **_ENCODER), _IMAGES[:, :8, :8], 10),
    "resnet_cbam": (dict(name="resnet", num_classes=10, widths=(8, 16), conv_attention="cbam",
                         reduction=4), _IMAGES[:, :16, :16], 10),
    "resnet_se": (dict(name="resnet", num_classes=10, widths=(8, 16), conv_attention="se",
                       reduction=4), _IMAGES[:, :16, :16], 10),
    "resnet_eca": (dict(name="resnet", num_classes=10, widths=(8, 16), conv_attention="eca"),
                   _IMAGES[:, :16, :16], 10),
    "text_transformer": (dict(num_classes=10, vocab_size=20, pool="mean", **_ENCODER),
                         _TOKENS, 10),
    "rnn_attention": (dict(num_classes=10, vocab_size=20, embed_dim=8, hidden_dim=16,
                           attention_units=8, cell="lstm"), _TOKENS, 10),
    "seq2seq_bahdanau": (dict(name="seq2seq", vocab_size=20, target_length=5, embed_dim=8,
                              hidden_dim=16, attention_units=8, score="bahdanau"),
                         {"source": _TOKENS, "target": _TOKENS[:, :5]}, 20),
    "seq2seq_luong": (dict(name="seq2seq", vocab_size=20, target_length=5, embed_dim=8,
                           hidden_dim=16, score="luong_general", cell="lstm"),
                      {"source": _TOKENS, "target": _TOKENS[:, :5]}, 20),
    "kwt": (dict(num_classes=12, num_mels=20, **_ENCODER), _CLIPS, 12),
    "conformer": (dict(num_classes=12, num_mels=20, subsample_channels=4, attention_units=8,
                       **_ENCODER), _CLIPS, 12),
    "keyframe_detector": (dict(widths=(8, 16), conv_attention="cbam", temporal="transformer",
                               **_ENCODER), _VIDEO, 1),
    "detr": (dict(num_classes=10, widths=(8, 16), hidden_dim=16, num_encoder_layers=1,
                  num_decoder_layers=2, num_heads=2, mlp_dim=32, num_queries=4),
             _IMAGES[:, :16, :16], 11),
    "show_attend_tell": (dict(vocab_size=20, target_length=5, widths=(4, 8), features=16,
                              embed_dim=8, hidden_dim=16, attention_units=8), _SCENES, 20),
    "transformer_captioner": (dict(vocab_size=20, target_length=5, widths=(4, 8), **_ENCODER),
                              _SCENES, 20),
    # One block each (a second adds compile time, not a new dtype path).
    "speech_recognizer": (dict(vocab_size=20, target_length=3, num_mels=20,
                               subsample_channels=4, hidden_dim=16, num_layers=1,
                               num_heads=2, mlp_dim=32),
                          {"audio": _CLIPS, "target": _TOKENS[:, :3]}, 20),
}


def _build(family, dtype):
  fields, _, _ = FAMILIES[family]
  fields = dict(fields)
  name = fields.pop("name", family)
  return models.build({"name": name, **fields, "dtype": dtype})


def _logits(outputs):
  return outputs["logits"] if isinstance(outputs, dict) else outputs


def _random_variables(shapes, seed=0):
  """Variables of the given shapes, drawn with numpy (no jitted init to
  compile): random weights everywhere, so no logit is trivially zero (the
  heads start at zero), LayerNorm scales near 1, BatchNorm's running mean 0
  and variance 1."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "mean":
      return np.zeros(leaf.shape, np.float32)
    if name == "var":
      return np.ones(leaf.shape, np.float32)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * noise
    if leaf.ndim >= 2:                     # weights: unit variance out of each
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 0.1 * noise
  return jax.tree_util.tree_map_with_path(draw, shapes)


# Suite time: the captioner is TransformerSeq2Seq over image regions, the
# same decoder speech_recognizer's entry checks in the default suite.
_SLOW_FAMILIES = {"transformer_captioner"}


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.slow) if f in _SLOW_FAMILIES else f for f in sorted(FAMILIES)])
def test_bfloat16_forward_pass_computes_in_bfloat16_and_stays_close(family):
  _, inputs, num_outputs = FAMILIES[family]
  model32, model16 = _build(family, "float32"), _build(family, "bfloat16")
  # Parameters are float32 whatever the compute dtype.
  shapes = jax.eval_shape(model16.init, jax.random.key(0), inputs)
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = _random_variables(shapes)

  def apply(model):
    return jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))

  out32, sown32 = apply(model32)(variables, inputs)
  out16, sown16 = apply(model16)(variables, inputs)
  logits32, logits16 = _logits(out32), _logits(out16)
  assert logits16.dtype == jnp.float32 and logits16.shape == logits32.shape
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation);
  # through a few layers the logits stay within 1% of their range (measured
  # 0.2% to 0.9% over these families).
  scale = float(jnp.abs(logits32).max())
  assert scale > 0.1, "the comparison needs non-trivial logits"
  error = float(jnp.abs(logits16 - logits32).max())
  assert error <= 0.03 * scale, (error, scale)

  products = _products(lambda v, x: model16.apply(v, x), variables, inputs)
  num_mels = FAMILIES[family][0].get("num_mels")
  _assert_computes_in_bfloat16(products, num_outputs, num_mels)

  # Pictures read float32 maps; the speech front end computes in float32
  # whatever the model's dtype, so its spectrogram is the float32 model's.
  for path, value in flax.traverse_util.flatten_dict(sown16["intermediates"]).items():
    for leaf in jax.tree_util.tree_leaves(value):
      assert leaf.dtype == jnp.float32, path
  if "num_mels" in FAMILIES[family][0]:
    np.testing.assert_allclose(sown16["intermediates"]["front_end"]["spectrogram"],
                               sown32["intermediates"]["front_end"]["spectrogram"], rtol=1e-6)


def test_unknown_dtype_is_a_value_error_naming_the_field():
  with pytest.raises(ValueError, match=r"config.model.dtype must be one of 'auto', 'float32', "
                                       r"'bfloat16', 'float16'; got 'bf16'"):
    models.build({"name": "vit", "num_classes": 10, "dtype": "bf16"})


def test_every_experiment_has_a_model_dtype():
  import experiments
  for name in experiments.names():
    config = experiments.get_config(name)
    assert config.model.dtype == "auto", name                  # bfloat16 on a TPU
    assert models.build(config.model).dtype == jnp.float32, name   # float32 on this CPU


def test_float16_forward_pass_runs():
  # The reference kernel: XLA's CPU dot_general has no float16 product with
  # float32 accumulation, which jax.nn's attention asks for under jit.
  model = _build("vit", "float16").clone(
      attention=AttentionConfig(kernel="reference"))
  _, images, _ = FAMILIES["vit"]
  variables = jax.jit(model.init)(jax.random.key(0), images)
  logits = jax.jit(model.apply)(variables, images)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_bfloat16_mnist_vit_trains_resumes_evaluates_in_bfloat16(tmp_path, tiny_config):
  """The tiny mnist_vit, end to end with ``model.dtype=bfloat16``: no product
  of the train step (forward and backward) is float32 but at the head, the
  attention's queries, keys and values are bfloat16, and the checkpoint holds
  float32 parameters and optimiser state."""
  import orbax.checkpoint as ocp
  from attention_lab import train
  from attention_lab.train import loop

  config = tiny_config(**{"model.dtype": "bfloat16"})
  workdir = str(tmp_path / "run")
  # Stops at 2 and resumes (bit-exact resumption against an uninterrupted run
  # is the float32 runs' test, tests/test_train.py).
  stopped = train.train_and_evaluate(config, workdir, stop_after=2)
  assert stopped["stopped_at_step"] == 2
  results = train.train_and_evaluate(config, workdir)
  assert results["step"] == config.total_steps and np.isfinite(results["eval_loss"])
  evaluated = train.evaluate_checkpoint(config, workdir)
  assert evaluated["accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-6)

  # What orbax wrote: every float array float32.
  step_dir = os.path.join(workdir, "checkpoints", str(config.total_steps), "state")
  metadata = ocp.StandardCheckpointer().metadata(step_dir)
  metadata = getattr(metadata, "item_metadata", metadata)
  dtypes = {str(m.dtype) for m in jax.tree_util.tree_leaves(metadata)
            if hasattr(m, "dtype") and jnp.issubdtype(m.dtype, jnp.floating)}
  assert dtypes == {"float32"}, dtypes

  exp, state = loop._restore_latest(config, workdir)
  assert exp.model.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
  batch = exp.batch(exp.data.train(0))
  step = functools.partial(loop.train_step, model=exp.model, task=exp.task, config=config,
                           schedule=exp.schedule, dropout_key=exp.dropout_key)
  with jax.set_mesh(exp.mesh):
    products = _products(step, state, batch)
  _assert_computes_in_bfloat16(products, config.model.num_classes, mixed_ok=True)

  images = batch["inputs"][:2]
  _, captured = exp.model.apply(loop.variables(state), images, capture_intermediates=True,
                                mutable=["intermediates"])
  attention = captured["intermediates"]["encoder"]["block_0"]["attention"]
  for projection in ("query", "key", "value", "out"):
    assert attention[projection]["__call__"][0].dtype == jnp.bfloat16, projection
  assert attention["attention_weights"][0].dtype == jnp.float32     # softmax in float32
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["dtype"] == "bfloat16"


def test_auto_dtype_is_bfloat16_on_tpu_only():
  """``config.model.dtype="auto"`` (every experiment's default, see above)
  computes in bfloat16 on a TPU and float32 elsewhere, here on the CPU."""
  assert models.compute_dtype("auto", backend="tpu") == jnp.bfloat16
  assert models.compute_dtype("auto", backend="gpu") == jnp.float32
  assert models.compute_dtype("auto") == jnp.float32           # this CPU
  with pytest.raises(ValueError, match="'auto', 'float32', 'bfloat16', 'float16'; got 'half'"):
    models.compute_dtype("half")
