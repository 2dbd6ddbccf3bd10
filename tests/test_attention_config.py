"""AttentionConfig: attention settings from the config to the kernel.

Rotary embeddings are checked against the rotation written out with complex
numbers in NumPy; mods named in a config against their formulas applied to a
dense float64 softmax; grouped K/V heads against repeating them by hand.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from conftest import override
from attention_lab import layers
from attention_lab import models
from attention_lab.layers import AttentionConfig
from attention_lab.layers import rotary
from attention_lab.train import validation

X = np.asarray(jax.random.normal(jax.random.key(0), (2, 12, 16)), np.float32)


def _rotate_complex(x, positions, base=10000.0):
  """float64: features ``m`` and ``m + d/2`` as one complex number, times
  ``exp(i * position * base^(-2m/d))``."""
  d = x.shape[-1]
  z = x[..., :d // 2] + 1j * x[..., d // 2:]
  theta = np.asarray(positions, np.float64)[..., None] * base ** (-np.arange(d // 2) * 2.0 / d)
  z = z * np.exp(1j * theta)[..., None, :]                  # [.., t, 1, d/2]: every head
  return np.concatenate([z.real, z.imag], -1)


def test_rotary_is_the_written_out_rotation_and_scores_depend_on_offsets_only():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 3, 8))
  positions = np.arange(9)
  np.testing.assert_allclose(rotary.apply_rotary(jnp.asarray(x, jnp.float32), positions),
                             _rotate_complex(x, positions), atol=1e-5)
  # The same vector at every position: the rotated scores are a Toeplitz matrix.
  q = np.broadcast_to(rng.normal(size=(1, 1, 1, 8)), (1, 9, 1, 8))
  k = np.broadcast_to(rng.normal(size=(1, 1, 1, 8)), (1, 9, 1, 8))
  scores = np.einsum("btnd,bsnd->ts", rotary.apply_rotary(jnp.asarray(q), positions),
                     rotary.apply_rotary(jnp.asarray(k), positions))
  for offset in range(-8, 9):
    diagonal = np.diagonal(scores, offset)
    np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-4)
  assert not np.allclose(np.diagonal(scores, 0)[0], np.diagonal(scores, 3)[0], atol=1e-3)


def test_rotary_2d_turns_half_the_pairs_by_row_and_half_by_column():
  x = np.random.default_rng(1).normal(size=(1, 6, 2, 8))
  grid = rotary.grid_positions(2, 3)                          # [6, 2]
  got = rotary.apply_rotary_2d(jnp.asarray(x, jnp.float32), grid)
  want = np.concatenate([_rotate_complex(x[..., :4], grid[:, 0]),
                         _rotate_complex(x[..., 4:], grid[:, 1])], -1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(rotary.grid_positions(2, 2, leading=1),
                                [[0, 0], [1, 1], [1, 2], [2, 1], [2, 2]])
  with pytest.raises(ValueError, match="divisible by 4, got 6"):
    rotary.apply_rotary_2d(jnp.ones((1, 4, 1, 6)), grid[:4])


def _dense_attention(x, params, heads, score=None, kv_heads=None, rotate=None):
  """float64 self-attention from the layer's parameters, written out."""
  p = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
  b = {k: np.asarray(v["bias"], np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  q = np.einsum("btf,fnd->btnd", x, p["query"]) + b["query"]
  k = np.einsum("btf,fnd->btnd", x, p["key"]) + b["key"]
  v = np.einsum("btf,fnd->btnd", x, p["value"]) + b["value"]
  if rotate is not None:
    q, k = rotate(q), rotate(k)
  if kv_heads:
    k, v = np.repeat(k, heads // kv_heads, axis=2), np.repeat(v, heads // kv_heads, axis=2)
  s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  if score is not None:
    t = s.shape[-1]
    s = score(s, np.arange(heads)[:, None, None], np.arange(t)[:, None], np.arange(t)[None, :])
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bnts,bsnd->btnd", w, v)
  return np.einsum("btnd,ndf->btf", o, p["out"]) + b["out"]


@pytest.mark.parametrize("kernel", ["reference", "blockwise"])
def test_settings_reach_the_kernel(kernel):
  """ALiBi named in the config, 1-D rotary embeddings and 2 K/V heads for 4
  query heads, through the layer, against the formulas written out."""
  config = AttentionConfig(kernel=kernel, score_mod="alibi", rotary="1d", num_kv_heads=2)
  layer = layers.SelfAttention(num_heads=4, attention=config)
  variables = layer.init(jax.random.key(1), X)
  params = variables["params"]
  assert params["key"]["kernel"].shape == (16, 2, 4)          # K/V projected to 2 heads
  slopes = 2.0 ** (-8.0 / 4 * np.arange(1, 5))                 # the paper's, 4 heads
  alibi = lambda s, h, i, j: s - slopes[h] * np.abs(i - j)     # symmetric: not causal
  want = _dense_attention(X, params, 4, score=alibi, kv_heads=2,
                          rotate=lambda x: _rotate_complex(x, np.arange(12)))
  np.testing.assert_allclose(layer.apply(variables, X), want, rtol=1e-4, atol=1e-4)


def test_learned_mods_get_gradients_and_qk_norm_has_parameters():
  config = AttentionConfig(score_mod="relative_bias", score_mod_args={"max_distance": 4},
                           qk_norm=True, kernel="blockwise")
  layer = layers.SelfAttention(num_heads=2, attention=config)
  params = layer.init(jax.random.key(2), X)["params"]
  assert params["relative_bias"].shape == (2, 9)
  assert {"query_norm", "key_norm"} <= set(params)
  grads = jax.grad(lambda p: layer.apply({"params": p}, X).sum())(params)
  assert np.abs(np.asarray(grads["relative_bias"])).sum() > 0
  learned = layers.SelfAttention(num_heads=2, attention=AttentionConfig(
      score_mod="alibi", score_mod_args={"learned": True}))
  slopes = learned.init(jax.random.key(3), X)["params"]["alibi_slopes"]
  np.testing.assert_allclose(slopes, [2.0 ** -4, 2.0 ** -8])


def test_a_vit_takes_2d_rotary_from_its_config_and_errors_name_the_setting():
  vit = models.build(dict(name="vit", num_classes=3, patch_size=7, hidden_dim=16,
                          num_layers=1, num_heads=2, mlp_dim=16,
                          attention={"rotary": "2d", "kernel": "reference"}))
  images = jnp.ones((1, 28, 28, 1))
  assert vit.attention == AttentionConfig(rotary="2d", kernel="reference")
  assert vit.apply(vit.init(jax.random.key(4), images), images).shape == (1, 3)
  text = models.build(dict(name="text_transformer", num_classes=2, vocab_size=10,
                           hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=16,
                           attention={"rotary": "2d"}))
  with pytest.raises(ValueError, match="rotary='2d' needs image patches"):
    text.init(jax.random.key(5), jnp.ones((1, 6), jnp.int32))
  with pytest.raises(ValueError, match=r"attention config has no field\(s\) \['kernal'\]"):
    AttentionConfig.from_config({"kernal": "reference"})
  with pytest.raises(ValueError, match="rotary must be one of None, '1d', '2d', got '3d'"):
    AttentionConfig(rotary="3d")


def test_every_transformer_experiment_exposes_every_setting_and_validates_them():
  fields = {f.name for f in dataclasses.fields(AttentionConfig)}
  config = experiments.get_config("listops_transformer")
  assert set(config.model.attention) == fields
  assert validation.problems(config) == []
  config.model.attention.score_mod = "alibi"
  config.model.attention.rotary = "1d"
  assert validation.problems(config) == []
  config.model.attention.rotary = "spiral"
  config.model.attention.dropout_rate = 1.5
  problems = validation.problems(config)
  assert any(p.startswith("config.model.attention.rotary='spiral'") for p in problems), problems
  assert any(p.startswith("config.model.attention.dropout_rate=1.5") for p in problems), problems


@pytest.mark.parametrize("kernel", ["reference", "blockwise"])
def test_sinks_take_weight_as_an_extra_key_with_zero_value(kernel):
  """Against the softmax over [scores, sink] written out, the sink's column
  dropped (its value is zero); the sink logits learn."""
  layer = layers.SelfAttention(num_heads=2, attention=AttentionConfig(kernel=kernel, sinks=True))
  variables = layer.init(jax.random.key(6), X)
  params = dict(variables["params"], sinks=jnp.asarray([0.5, -1.0]))
  got, sown = layer.apply({"params": params}, X, mutable=["intermediates"])

  p = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items() if k != "sinks"}
  b = {k: np.asarray(v["bias"], np.float64) for k, v in params.items() if k != "sinks"}
  x = np.asarray(X, np.float64)
  q, k, v = (np.einsum("btf,fnd->btnd", x, p[n]) + b[n] for n in ("query", "key", "value"))
  s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  sink = np.broadcast_to(np.asarray([0.5, -1.0])[None, :, None, None], s.shape[:3] + (1,))
  full = np.concatenate([s, sink], -1)
  w = np.exp(full - full.max(-1, keepdims=True))
  w = (w / w.sum(-1, keepdims=True))[..., :-1]
  want = np.einsum("btnd,ndf->btf", np.einsum("bnts,bsnd->btnd", w, v), p["out"]) + b["out"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  sown_weights = np.asarray(jax.tree.leaves(sown["intermediates"])[0])
  np.testing.assert_allclose(sown_weights, w, rtol=1e-4, atol=1e-6)
  assert np.all(sown_weights.sum(-1) < 1.0)
  grads = jax.grad(lambda p: layer.apply({"params": p}, X).sum())(params)
  assert np.all(np.abs(np.asarray(grads["sinks"])) > 0)


def test_t5_buckets_from_the_config():
  layer = layers.SelfAttention(num_heads=2, attention=AttentionConfig(
      score_mod="t5_relative_bias", score_mod_args={"num_buckets": 16, "max_distance": 64},
      kernel="blockwise"))
  params = layer.init(jax.random.key(7), X)["params"]
  assert params["t5_relative_bias"].shape == (2, 16)
  grads = jax.grad(lambda p: layer.apply({"params": p}, X).sum())(params)
  used = np.abs(np.asarray(grads["t5_relative_bias"])).sum(0) > 0
  # 12 tokens: distances up to 11 each way; 8 buckets a direction, 4 exact.
  assert used.sum() > 8


def _with(name, **overrides):
  """``name``'s config with ``model__attention__window=4``-style overrides
  (``__`` for the dots keyword names cannot hold)."""
  config = experiments.get_config(name)
  with config.unlocked():
    return override(config, **{path.replace("__", "."): v for path, v in overrides.items()})


@pytest.mark.parametrize("experiment, overrides, line", [
    ("listops_transformer", {"model__attention__score_mod": "softcap"},
     "config.model.attention.score_mod_args={}: score_mod_args for softcap: missing a "
     "required argument: 'cap'; softcap takes (cap)"),
    ("listops_transformer", {"model__attention__score_mod": "alibi",
                             "model__attention__score_mod_args": {"slope": 1.0}},
     "config.model.attention.score_mod_args={'slope': 1.0}: score_mod_args for alibi: got an "
     "unexpected keyword argument 'slope'; alibi takes (learned=False, symmetric=None)"),
    ("listops_transformer", {"model__attention__mask_mod": "sliding_window"},
     "config.model.attention.mask_mod_args={}: mask_mod_args for sliding_window: missing a "
     "required argument"),
    ("listops_transformer", {"model__attention__window": -3},
     "config.model.attention.window=-3: window must be a number of keys w >= 0"),
    ("listops_transformer", {"model__attention__window": (4, "x")},
     "config.model.attention.window=(4, 'x'): window must be"),
    ("mnist_vit", {"model__attention__num_kv_heads": 3},
     "config.model.attention.num_kv_heads=3: must divide model.num_heads (4)"),
    ("listops_transformer", {"model__attention__rotary": "2d"},
     "config.model.attention.rotary='2d': '2d' turns queries and keys by their row and column "
     "in a patch grid, which model 'text_transformer' does not have (models with one: vit)"),
    ("numbers_transformer", {"model__attention__window": 4},
     "config.model.attention.window=4: is not supported by the cached decoder"),
])
def test_settings_the_layers_cannot_build_are_one_line_each(experiment, overrides, line):
  """Each used to pass validation and fail while the model was traced."""
  problems = validation.problems(_with(experiment, **overrides))
  assert len(problems) == 1 and problems[0].startswith(line), problems


def test_settings_the_layers_can_build_pass():
  assert validation.problems(_with("mnist_vit", model__attention__rotary="2d",
                                   model__attention__num_kv_heads=2,
                                   model__attention__window=(3, 0))) == []
  assert validation.problems(_with(
      "listops_transformer", model__attention__score_mod="softcap",
      model__attention__score_mod_args={"cap": 30.0}, model__attention__mask_mod="sliding_window",
      model__attention__mask_mod_args={"window": 8})) == []
  with pytest.raises(ValueError, match="score_mod_args for softcap: missing a required"):
    AttentionConfig(score_mod="softcap")


def test_device_problems_name_the_mesh_and_a_kernel_for_another_platform():
  devices = jax.device_count()
  config = _with("mnist_vit", mesh__sequence=devices + 1,
                 model__attention__kernel="splash")
  assert validation.problems(config) == []              # fields alone are fine
  assert validation.device_problems(config) == [
      f"config.mesh.sequence={devices + 1}: must divide the device count ({devices})",
      "config.model.attention.kernel='splash': attention kernel 'splash' does not run on cpu "
      "(platforms: tpu); pin it to its platform instead, e.g. 'tpu=splash'"]
  config = _with("mnist_vit", mesh__data=devices + 1, model__attention__kernel="tpu=splash")
  assert validation.device_problems(config) == [
      f"config.mesh.data={devices + 1}: times config.mesh.sequence (1) must equal the device "
      f"count ({devices}); -1 takes every device the sequence axis leaves"]
  assert validation.device_problems(_with("mnist_vit")) == []
