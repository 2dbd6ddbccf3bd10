"""Convolutional attention (SE, ECA, CBAM) and the image models that use it.

The modules are checked against numpy re-computations from their own
parameters, and their parameter counts against the papers' formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import models
from attention_lab.layers import conv_attention as ca
from attention_lab.viz import sown as sown_lib


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _init(module, x):
  return module.init(jax.random.key(0), x)["params"]


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _feature_map(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("channels,reduction", [(64, 16), (32, 4), (24, 8), (8, 16)])
def test_squeeze_excite_parameter_count(channels, reduction):
  hidden = max(channels // reduction, 1)
  params = _init(ca.SqueezeExcite(reduction), _feature_map((1, 4, 4, channels)))
  # Paper: 2 C^2 / r weights; plus the two Dense biases (C/r and C).
  assert _count(params) == 2 * channels * hidden + hidden + channels


@pytest.mark.parametrize("channels,expected_k", [
    (8, 3), (16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_kernel_size_and_parameter_count(channels, expected_k):
  # k = |log2(C)/2 + 1/2| made odd, worked by hand for each C.
  assert ca.eca_kernel_size(channels) == expected_k
  params = _init(ca.ECA(), _feature_map((1, 2, 2, channels)))
  assert _count(params) == expected_k


@pytest.mark.parametrize("channels,reduction,k", [(64, 16, 7), (32, 4, 3)])
def test_cbam_parameter_count(channels, reduction, k):
  hidden = channels // reduction
  params = _init(ca.CBAM(reduction, spatial_kernel=k), _feature_map((1, 8, 8, channels)))
  assert _count(params) == (2 * channels * hidden + hidden + channels) + 2 * k * k


def _mlp(p, x):
  h = np.maximum(x @ np.asarray(p["reduce"]["kernel"]) + np.asarray(p["reduce"]["bias"]), 0)
  return h @ np.asarray(p["expand"]["kernel"]) + np.asarray(p["expand"]["bias"])


def test_squeeze_excite_matches_numpy():
  x = _feature_map((2, 5, 3, 16))
  module = ca.SqueezeExcite(reduction=4)
  params = _init(module, x)
  out, sown = module.apply({"params": params}, x, mutable=["intermediates"])
  xn = np.asarray(x, np.float64)
  gate = _sigmoid(_mlp(params["mlp"], xn.mean(axis=(1, 2))))
  np.testing.assert_allclose(out, xn * gate[:, None, None, :], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sown["intermediates"]["channel_weights"][0], gate, rtol=1e-5)


def test_eca_matches_numpy_conv_across_channels():
  x = _feature_map((2, 3, 4, 16), seed=1)
  module = ca.ECA()
  params = _init(module, x)
  out = module.apply({"params": params}, x)
  taps = np.asarray(params["conv"]["kernel"])[:, 0, 0]          # [k]
  k = len(taps)
  pooled = np.asarray(x, np.float64).mean(axis=(1, 2))           # [b, c]
  padded = np.pad(pooled, ((0, 0), (k // 2, k // 2)))
  scores = np.stack([padded[:, c:c + k] @ taps for c in range(16)], axis=-1)
  np.testing.assert_allclose(out, np.asarray(x) * _sigmoid(scores)[:, None, None, :],
                             rtol=1e-5, atol=1e-6)


def test_cbam_matches_numpy():
  x = _feature_map((2, 6, 5, 8), seed=2)
  module = ca.CBAM(reduction=2, spatial_kernel=3)
  params = _init(module, x)
  out, sown = module.apply({"params": params}, x, mutable=["intermediates"])
  xn = np.asarray(x, np.float64)
  channel = _sigmoid(_mlp(params["mlp"], xn.mean(axis=(1, 2))) +
                     _mlp(params["mlp"], xn.max(axis=(1, 2))))
  y = xn * channel[:, None, None, :]
  pooled = np.stack([y.mean(-1), y.max(-1)], axis=-1)            # [b, h, w, 2]
  kernel = np.asarray(params["spatial_conv"]["kernel"])[..., 0]  # [3, 3, 2]
  padded = np.pad(pooled, ((0, 0), (1, 1), (1, 1), (0, 0)))
  logits = np.zeros(pooled.shape[:3])
  for i in range(6):
    for j in range(5):
      logits[:, i, j] = np.einsum("bhwc,hwc->b", padded[:, i:i + 3, j:j + 3], kernel)
  spatial = _sigmoid(logits)
  np.testing.assert_allclose(out, y * spatial[..., None], rtol=1e-5, atol=1e-6)
  inter = sown["intermediates"]
  assert inter["channel_weights"][0].shape == (2, 8)
  np.testing.assert_allclose(inter["spatial_map"][0], spatial, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["se", "eca", "cbam"])
def test_gates_keep_shape_and_dtype(kind):
  x = _feature_map((2, 7, 7, 16)).astype(jnp.bfloat16)
  module = ca.make(kind, reduction=4)
  out = module.apply({"params": _init(module, x)}, x)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_conv_attention_errors_name_the_problem():
  assert ca.make("none") is None
  with pytest.raises(ValueError, match="unknown conv_attention 'bam'.*cbam"):
    ca.make("bam")
  with pytest.raises(ValueError, match=r"feature map \[batch, height, width, channels\]"):
    _init(ca.SqueezeExcite(), jnp.ones((2, 16)))
  with pytest.raises(ValueError, match="reduction"):
    ca.hidden_units(16, 0)


def _resnet(kind, **kw):
  config = dict(name="resnet", num_classes=10, widths=(8, 16), blocks_per_stage=1,
                conv_attention=kind, reduction=4, spatial_kernel=7)
  config.update(kw)
  return models.build(config)


def test_resnet_parameter_overhead_of_each_attention():
  images = jnp.zeros((2, 12, 12, 1))
  counts = {kind: _count(_resnet(kind).init(jax.random.key(0), images)["params"])
            for kind in ca.CONV_ATTENTIONS}
  se = sum(2 * c * (c // 4) + c // 4 + c for c in (8, 16))
  assert counts["se"] - counts["none"] == se
  assert counts["eca"] - counts["none"] == 2 * 3                  # k = 3 at 8 and 16 channels
  assert counts["cbam"] - counts["none"] == se + 2 * 2 * 7 * 7


def test_resnet_batch_norm_statistics_update_in_training_only():
  model = _resnet("cbam")
  images = jax.random.uniform(jax.random.key(1), (4, 12, 12, 1))
  variables = model.init(jax.random.key(0), images)
  assert "batch_stats" in variables
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10)
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  after = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  # In evaluation the running statistics are read, not written.
  _, sown = model.apply(variables, images, mutable=["intermediates"])
  spatial = sown_lib.collect_sown(sown["intermediates"], "spatial_map")
  assert [m for m, _ in spatial] == ["stage0_block0/attention", "stage1_block0/attention"]
  assert spatial[0][1].shape == (4, 12, 12) and spatial[1][1].shape == (4, 6, 6)


def test_resnet_rejects_unknown_attention_and_bad_shapes():
  with pytest.raises(ValueError, match="unknown conv_attention 'sk'"):
    _resnet("sk").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="ResNet expects"):
    _resnet("se").init(jax.random.key(0), jnp.zeros((8, 8, 1)))


def test_pixel_transformer_reads_intensity_tokens():
  model = models.build(dict(name="pixel_transformer", num_classes=10, hidden_dim=8,
                            num_layers=1, num_heads=1, mlp_dim=16))
  images = jax.random.uniform(jax.random.key(0), (2, 6, 5, 1))
  variables = model.init(jax.random.key(1), images)
  logits, sown = model.apply(variables, images, mutable=["intermediates"])
  assert logits.shape == (2, 10)
  weights = sown_lib.collect_attention(sown["intermediates"])
  assert weights[0].shape == (2, 1, 31, 31)                        # 30 pixels + CLS
  with pytest.raises(ValueError, match="grayscale=True"):
    model.init(jax.random.key(1), jnp.zeros((2, 6, 5, 3)))
