"""Rollout math against a hand-computed example, and the drawing helpers."""

import os

import numpy as np
import pytest

from attention_lab.viz import cnn
from attention_lab.viz import drawers
from attention_lab.viz import images as images_viz
from attention_lab.viz import index as index_lib
from attention_lab.viz import panels
from attention_lab.viz import rollout
from attention_lab.viz import sown as sown_lib


def test_rollout_by_hand():
  # Two layers, one head, two tokens.
  a1 = np.array([[[[0.5, 0.5], [0.0, 1.0]]]])
  a2 = np.array([[[[1.0, 0.0], [0.25, 0.75]]]])
  # Add identity, renormalise rows:
  #   r1 = [[0.75, 0.25], [0, 1]],  r2 = [[1, 0], [0.125, 0.875]]
  # rollout = r2 @ r1 = [[0.75, 0.25], [0.09375, 0.90625]]
  got = rollout.attention_rollout([a1, a2])
  np.testing.assert_allclose(got[0], [[0.75, 0.25], [0.09375, 0.90625]])
  np.testing.assert_allclose(got.sum(-1), 1.0)


def test_rollout_averages_heads_and_rejects_bad_shapes():
  heads = np.stack([np.eye(3), np.full((3, 3), 1 / 3)])[None]      # [1, 2, 3, 3]
  got = rollout.attention_rollout([heads], residual=0.0)
  np.testing.assert_allclose(got[0], (np.eye(3) + 1 / 3) / 2)
  with pytest.raises(ValueError, match="tokens, tokens"):
    rollout.attention_rollout([np.ones((1, 2, 3, 4))])
  with pytest.raises(ValueError, match="at least one layer"):
    rollout.attention_rollout([])


def test_grid_and_upsample():
  grid = rollout.tokens_to_grid(np.arange(12.0), 30, 40)
  assert grid.shape == (3, 4)
  up = rollout.upsample(grid, 30, 40)
  assert up.shape == (30, 40) and up[0, 0] == 0 and up[29, 39] == 11
  with pytest.raises(ValueError, match="do not tile"):
    rollout.tokens_to_grid(np.arange(7.0), 28, 28)


def test_collect_attention_orders_layers_numerically():
  tree = {"encoder": {f"block_{i}": {"attention": {"attention_weights": (np.full((1, 1, 2, 2), i),)}}
                      for i in (10, 2, 1)}}
  layers = sown_lib.collect_attention(tree)
  assert [int(w[0, 0, 0, 0]) for w in layers] == [1, 2, 10]


def test_unknown_viz_kind(tmp_path):
  with pytest.raises(ValueError, match="unknown viz kind 'sound'"):
    drawers.draw_examples("sound", str(tmp_path))


def test_picture_tags_stay_the_same_across_evaluations():
  assert index_lib.picture_tag("/w/attention/example0_label6_pred5_heads.png") == \
      "attention/example0_heads"
  assert index_lib.picture_tag("example1_label3_pred3_input.png") == "attention/example1_input"


def test_index_lists_every_example_with_its_pictures(tmp_path):
  out = str(tmp_path)
  pictures = {}
  for i in range(2):
    image = np.random.default_rng(i).random((8, 8, 1))
    pictures.update(panels.draw_input_image(image, f"{out}/example{i}_label{i}_pred1_input.png", "x"))
    pictures.update(cnn.draw_spatial_maps(
        image, [("stage0_block0/attention", np.full((4, 4), 0.5))],
        f"{out}/example{i}_label{i}_pred1_spatial.png", "x"))
  path = index_lib.write_index(out, "demo <run>", [0, 1], [1, 1], pictures)
  page = open(path).read()
  assert "demo &lt;run&gt;" in page                         # escaped
  assert page.count("<tr") == 2 and page.count('class="wrong"') == 1
  # The input comes first in its row.
  assert page.index("example0_label0_pred1_input.png") < page.index("example0_label0_pred1_spatial.png")
  index_lib.clear_pictures(out)
  assert os.listdir(out) == []


@pytest.mark.parametrize("kernel", ["reference", "jax_nn", "blockwise", "pallas"])
def test_vit_attention_and_its_pictures_are_float64_attention_with_every_kernel(
    tmp_path, kernel):
  """In a two-layer ViT run by each kernel, every attention layer's output and
  the weights it sows for pictures equal a float64 numpy attention of that
  layer's own input and parameters, and the logits agree across kernels. (The
  sown weights are recomputed from queries and keys whatever kernel ran, so
  comparing them across kernels would prove nothing.)"""
  import flax.linen as nn
  import jax
  from attention_lab import layers
  from attention_lab import models
  from conftest import numpy_self_attention
  config = dict(name="vit", num_classes=10, patch_size=7, hidden_dim=16, num_layers=2,
                num_heads=2, mlp_dim=16)
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  params = models.build(dict(config, attention={"kernel": "reference"})).init(jax.random.key(1), images)
  seen = {}                                      # layer path -> (input, output)

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.MultiHeadAttention) and context.method_name == "__call__":
      assert kwargs.get("mask") is None and kwargs.get("bias") is None
      seen.setdefault(context.module.path, (np.asarray(args[0]), np.asarray(out)))
    return out

  with nn.intercept_methods(record):
    logits, sown = models.build(dict(config, attention={"kernel": kernel})).apply(
        params, images, mutable=["intermediates"])
  weights = sown_lib.collect_attention(sown["intermediates"])
  assert len(seen) == len(weights) == 2
  for (path, (inputs, out)), sown_weights in zip(sorted(seen.items()), weights):
    layer = params["params"]
    for name in path:
      layer = layer[name]
    want_out, want_weights = numpy_self_attention(layer, inputs)
    assert sown_weights.shape == want_weights.shape == (2, 2, 17, 17)   # 16 patches + CLS
    np.testing.assert_allclose(sown_weights, want_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  if kernel != "reference":
    want_logits = models.build(dict(config, attention={"kernel": "reference"})).apply(params, images)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  # The pictures are drawn from these weights: one head grid per example.
  pictures = images_viz.draw_image_examples(
      str(tmp_path), np.asarray(images), np.zeros(2, int), np.zeros(2, int),
      sown["intermediates"])
  assert len([p for p in pictures if p.endswith("_heads.png")]) == 2


def _pixels(path):
  from PIL import Image
  with Image.open(path) as image:
    return np.asarray(image.convert("L"), np.float32)


def test_token_html_shades_by_weight_and_escapes(tmp_path):
  from attention_lab.viz import sequences
  path = str(tmp_path / "example0_tokens.html")
  sequences.token_html(["<b>", " ", "ok", "\x07"], np.array([0.1, 0.0, 0.6, 0.3]), path, "t")
  page = open(path).read()
  assert "&lt;b&gt;" in page and "<b>" not in page.replace("<b>t</b>", "")
  assert "\u00b7" in page and "\\x07" in page            # space and control byte made visible
  alphas = [float(a) for a in __import__("re").findall(r"rgba\(220, 50, 30, ([0-9.]+)\)", page)]
  assert alphas == pytest.approx([1 / 6, 0.0, 1.0, 0.5], abs=1e-3)
  with pytest.raises(ValueError, match="3 tokens but 2 weights"):
    sequences.token_html(["a", "b", "c"], np.ones(2), path, "t")
  # The index inlines the fragment next to the example's pictures.
  index = index_lib.write_index(str(tmp_path), "run", [1], [1], {path: None})
  assert "rgba(220, 50, 30, 1.000)" in open(index).read()


def test_alignment_picture(tmp_path):
  from attention_lab.viz import sequences
  source, target = list("3 May 1998"), list("1998-05-03")
  weights = np.random.default_rng(0).dirichlet(np.ones(len(source)), size=len(target))
  path = str(tmp_path / "align.png")
  pictures = sequences.draw_alignment(weights, source, target, path, "dates")
  pixels = _pixels(path)
  assert pictures[path].shape[:2] == pixels.shape and min(pixels.shape) >= 250
  assert pixels.std() > 5
  with pytest.raises(ValueError, match=r"do not match 10 output x 10 input"):
    sequences.draw_alignment(weights[:, :4], source, target, path, "dates")
  with pytest.raises(ValueError, match="NaN"):
    sequences.draw_alignment(np.full((10, 10), np.nan), source, target, path, "dates")


def test_spectrogram_attention_picture(tmp_path):
  from attention_lab.viz import sequences
  rng = np.random.default_rng(0)
  spec = rng.normal(size=(98, 40))
  path = str(tmp_path / "spec.png")
  sequences.draw_spectrogram_attention(
      spec, {"pooling": rng.dirichlet(np.ones(98)), "CLS, last layer": rng.dirichlet(np.ones(98))},
      path, "yes")
  pixels = _pixels(path)
  assert pixels.shape == (420, 700) and pixels.std() > 5
  with pytest.raises(ValueError, match=r"expected \(98,\)"):
    sequences.draw_spectrogram_attention(spec, {"cls": np.ones(50)}, path, "yes")


def test_head_grid_labels_short_token_sequences(tmp_path):
  weights = [np.random.default_rng(0).dirichlet(np.ones(6), size=(1, 2, 6))]
  plain = panels.draw_head_grid(weights, 0, str(tmp_path / "a.png"))
  labelled = panels.draw_head_grid(weights, 0, str(tmp_path / "b.png"), tokens=list("[CLS]x"))
  (a,), (b,) = plain.values(), labelled.values()
  assert a.shape == b.shape                    # same size, but ticks drawn in b
  assert not np.array_equal(a, b)
