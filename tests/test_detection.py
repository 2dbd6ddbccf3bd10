"""DETR-style detection (issue 19, detection part): the digit scenes and their
TFDS builder, generalized IoU, the Hungarian matching, COCO mAP, the model
and what it sows, the pictures, and one tiny end-to-end run."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from attention_lab import data
from attention_lab import models
from attention_lab import train
from attention_lab.data import scenes
from attention_lab.data import sources
from attention_lab.data.builders import moving_digits_offline
from attention_lab.train import tasks
from attention_lab.viz import detection as detection_viz
from conftest import assert_picture
from conftest import override
from conftest import train_stop_and_resume

# --- scenes ----------------------------------------------------------------------


def _square_pool(classes=10, level=lambda c: 0.3 + 0.06 * c):
  """One 28x28 'digit' per class: a filled square of brightness
  ``level(class)`` (uint8), so an object in a scene is known by its value."""
  digits = np.stack([np.full((28, 28), round(255 * level(c)), np.uint8)
                     for c in range(classes)])
  return digits, np.arange(classes)


def test_boxes_and_classes_match_the_pixels():
  """Without overlap, clutter or noise, the ink of a scene is exactly the
  union of its boxes, and each box holds the brightness of its class."""
  digits, labels = _square_pool()
  settings = scenes.SceneSettings(max_overlap=0.0, clutter=(0, 0), noise=0.0,
                                  digit_sides=(16, 20))
  counts = set()
  for seed in range(30):
    scene = scenes.make_scene(digits, labels, np.random.default_rng(seed), settings)
    image = scene["image"][..., 0].astype(np.float64) / 255
    boxes = np.rint(scene["bbox"] * settings.size).astype(int)
    counts.add(len(boxes))
    covered = np.zeros(image.shape, bool)
    for (top, left, bottom, right), label in zip(boxes, scene["label"]):
      assert 0 <= top < bottom <= settings.size and 0 <= left < right <= settings.size
      np.testing.assert_allclose(image[top:bottom, left:right], 0.3 + 0.06 * label,
                                 atol=1.5 / 255)
      covered[top:bottom, left:right] = True
    np.testing.assert_array_equal(image >= settings.ink_threshold, covered)
  assert counts == {1, 2, 3, 4, 5}


def test_overlap_stays_under_its_limit_and_sources_name_the_digits():
  digits, labels = _square_pool()
  settings = scenes.SceneSettings()
  for seed in range(30):
    scene = scenes.make_scene(digits, labels, np.random.default_rng(seed), settings)
    boxes = scene["bbox"] * settings.size
    for a, b in itertools.combinations(boxes, 2):
      assert scenes.box_iou(a, b) <= settings.max_overlap + 1e-9
    used = scene["sources"][scene["sources"] >= 0]
    # Objects come first in the sources, and each object's class is its digit's.
    np.testing.assert_array_equal(labels[used[:len(scene["label"])]], scene["label"])


def test_scenes_are_a_function_of_the_seed():
  digits, labels = _square_pool()
  first = list(scenes.make_scenes(digits, labels, 3, seed=7))
  again = list(scenes.make_scenes(digits, labels, 4, seed=7))[:3]
  other = list(scenes.make_scenes(digits, labels, 3, seed=8))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_bad_settings_and_pools_are_named():
  with pytest.raises(ValueError, match="objects"):
    scenes.SceneSettings(objects=(0, 3))
  with pytest.raises(ValueError, match="digit_sides"):
    scenes.SceneSettings(digit_sides=(16, 80))
  with pytest.raises(ValueError, match="one label per digit"):
    scenes.make_scene(np.zeros((2, 28, 28), np.uint8), np.arange(3), np.random.default_rng(0))


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("scenes_tfds"))


def test_builder_uses_held_out_digits_only_in_test(scenes_dir):
  train_split = sources.load_split("digit_scenes_offline/smoke", "train", scenes_dir,
                                   example_map=scenes.pad_objects(_data_config()))
  test_split = sources.load_split("digit_scenes_offline/smoke", "test", scenes_dir,
                                  example_map=scenes.pad_objects(_data_config()))
  assert train_split["image"].shape == (64, 64, 64, 1)
  assert test_split["objects"]["bbox"].shape == (32, 5, 4)
  _, _, (train_pool, test_pool) = moving_digits_offline.mnist_digits()
  used_in_test = set(test_split["sources"][test_split["sources"] >= 0].tolist())
  used_in_train = set(train_split["sources"][train_split["sources"] >= 0].tolist())
  assert used_in_test <= set(test_pool.tolist())
  assert used_in_train <= set(train_pool.tolist())
  assert not used_in_test & used_in_train

  config = experiments.get_config("scenes_detr")
  config.data.name = "digit_scenes_offline/smoke"
  config.data.data_dir = scenes_dir
  bundle = data.build(config)
  inputs, label = bundle.eval["inputs"], bundle.eval["label"]
  assert inputs.shape == (32, 64, 64, 1) and inputs.dtype == np.float32
  assert 0.0 <= inputs.min() and inputs.max() <= 1.0
  assert label.shape == (32, 5, 5) and label.dtype == np.float32
  real = label[..., 4] >= 0
  assert real[:, 0].all() and set(np.unique(label[..., 4][real])) <= set(range(10))
  boxes = label[..., :4][real]
  assert (boxes >= 0).all() and (boxes <= 1).all()
  assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
  assert (label[~real] == np.array([0, 0, 0, 0, -1])).all()


def _data_config(image_size=64, max_objects=5):
  import ml_collections
  return ml_collections.ConfigDict({"image_size": image_size, "max_objects": max_objects})


def test_pad_objects_fits_other_detection_datasets():
  """A TFDS detection example of another size and object count (as ``voc``
  gives) comes out at the configured size with its objects cut or padded."""
  import tensorflow as tf
  fit = scenes.pad_objects(_data_config(image_size=32, max_objects=3))
  many = {"image": tf.zeros((48, 80, 3), tf.uint8),
          "objects": {"bbox": tf.reshape(tf.range(28, dtype=tf.float32) / 28, (7, 4)),
                      "label": tf.range(7, dtype=tf.int64)}}
  out = fit(many)
  assert out["image"].shape == (32, 32, 3)
  np.testing.assert_array_equal(out["objects"]["label"], [0, 1, 2])
  few = fit({"image": tf.fill((32, 32, 1), tf.constant(9, tf.uint8)),
             "objects": {"bbox": tf.constant([[0.1, 0.2, 0.3, 0.4]]),
                         "label": tf.constant([4], tf.int64)}})
  np.testing.assert_array_equal(few["objects"]["label"], [4, -1, -1])
  np.testing.assert_allclose(few["objects"]["bbox"], [[0.1, 0.2, 0.3, 0.4], [0] * 4, [0] * 4])
  assert int(few["image"][0, 0, 0]) == 9                 # already the size: untouched


# --- generalized IoU, matching, loss ----------------------------------------------


def _giou_float64(a, b):
  """GIoU of two (ymin, xmin, ymax, xmax) boxes, written from its definition:
  IoU - |C minus (A union B)| / |C|, C the smallest box enclosing both."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
  inter_h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  inter_w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = inter_h * inter_w
  union = area(a) + area(b) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull


def _random_boxes(rng, n):
  corners = rng.uniform(0, 1, (n, 2, 2))
  low, high = corners.min(1), corners.max(1) + 0.01
  return np.concatenate([low, high], -1).astype(np.float32)


def test_generalized_iou_against_its_definition_in_float64():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
  b[0] = a[0]                                             # identical: 1
  b[1] = [0.0, 0.0, 0.1, 0.1]; a[1] = [0.5, 0.5, 0.6, 0.6]  # apart: negative
  got = np.asarray(tasks.generalized_iou(jnp.asarray(a), jnp.asarray(b)), np.float64)
  want = np.array([[_giou_float64(x, y) for y in b] for x in a])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got[0, 0] == pytest.approx(1.0) and got[1, 1] < 0


def test_matching_finds_the_cheapest_assignment_by_brute_force():
  rng = np.random.default_rng(1)
  for trial in range(40):
    queries, objects = rng.integers(1, 6), rng.integers(1, 4)
    objects = min(objects, queries)
    cost = rng.normal(size=(1, queries, objects + 1))
    valid = np.ones((1, objects + 1), bool)
    valid[0, rng.integers(objects + 1)] = False          # a padding row anywhere
    assigned = tasks.hungarian_numpy(cost, valid)[0]
    columns = np.flatnonzero(valid[0])
    got = cost[0, assigned[columns], columns].sum()
    assert len(set(assigned[columns].tolist())) == len(columns)
    best = min(cost[0, list(p), columns].sum()
               for p in itertools.permutations(range(queries), len(columns)))
    assert got == pytest.approx(best), trial
    assert assigned[~valid[0]].tolist() == [0]


def test_matching_inside_jit_is_the_cheapest_assignment():
  """``match_queries`` in a jitted step (and vmapped over a leading axis)
  against every assignment tried by brute force in float64; the solver
  behind it (scipy) is not the reference. Random costs: the cheapest is
  unique, so the queries themselves must agree."""
  rng = np.random.default_rng(2)
  cost = rng.normal(size=(2, 3, 6, 4)).astype(np.float32)
  valid = rng.random((2, 3, 4)) < 0.7
  valid[0, 0] = False                                    # an image with no objects
  valid[0, 1] = True                                     # one with every slot filled
  got = np.asarray(jax.jit(jax.vmap(tasks.match_queries))(jnp.asarray(cost),
                                                           jnp.asarray(valid)))
  assert got.shape == valid.shape and got.dtype == np.int32
  for index in np.ndindex(valid.shape[:2]):
    columns = np.flatnonzero(valid[index])
    c = cost[index].astype(np.float64)
    best = min(itertools.permutations(range(c.shape[0]), len(columns)),
               key=lambda queries: c[list(queries), columns].sum())
    assert got[index][columns].tolist() == list(best), index
    assert (got[index][~valid[index]] == 0).all(), index
  with pytest.raises(ValueError, match="only 2 queries"):
    tasks.hungarian_numpy(np.zeros((1, 2, 3)), np.ones((1, 3), bool))


def _detr_config():
  return experiments.get_config("scenes_detr")


def test_loss_of_perfect_boxes_is_the_class_term_alone():
  """Queries 0 and 2 hold the two objects' exact boxes: matching finds them
  (L1 and 1 - GIoU are 0) and the class loss is the weighted cross-entropy
  written out here."""
  config = _detr_config()
  label = np.array([[[0.1, 0.1, 0.4, 0.3, 7], [0.5, 0.5, 0.9, 0.8, 2],
                     [0, 0, 0, 0, -1]]], np.float32)
  boxes = np.array([[label[0, 0, :4], [0.0, 0.0, 0.05, 0.05], label[0, 1, :4],
                     [0.9, 0.9, 1.0, 1.0]]], np.float32)
  logits = np.random.default_rng(3).normal(size=(1, 4, 11)).astype(np.float32)
  logits[0, 0, 7] += 6.0
  logits[0, 2, 2] += 6.0                        # confident, so the match follows the boxes
  outputs = {"logits": jnp.asarray(logits[None]), "boxes": jnp.asarray(boxes[None])}
  loss, metrics = tasks.TASKS["detection"].train_loss(outputs, {"label": jnp.asarray(label)},
                                                      config)
  assert float(metrics["l1_loss"]) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics["giou_loss"]) == pytest.approx(0.0, abs=1e-6)
  log_probs = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
  targets, weights = [7, 10, 2, 10], [1.0, 0.1, 1.0, 0.1]
  want = -sum(w * log_probs[q, t] for q, (t, w) in enumerate(zip(targets, weights)))
  want /= sum(weights)
  assert float(metrics["class_loss"]) == pytest.approx(want, rel=1e-5)
  assert float(loss) == pytest.approx(want, rel=1e-5)    # one layer: nothing else


# --- mAP ---------------------------------------------------------------------------


def _detections_of(labels, score=0.9, shift=0.0):
  """Detections ``[n, objects, 6]`` at the true boxes (moved right by
  ``shift`` times each box's width), with the true classes; padding rows
  become zero-score ones."""
  width = labels[..., 3:4] - labels[..., 1:2]
  boxes = labels[..., :4] + shift * width * np.array([0, 1, 0, 1])
  real = labels[..., 4:5] >= 0
  return np.concatenate([boxes, np.maximum(labels[..., 4:5], 0),
                         np.where(real, score, 0.0)], axis=-1)


def _some_labels():
  rng = np.random.default_rng(4)
  labels = np.zeros((6, 3, 5))
  labels[..., 4] = -1
  for i in range(6):
    for j in range(1 + i % 3):
      labels[i, j, :4] = _random_boxes(rng, 1)[0] * 0.5 + 0.1
      labels[i, j, 4] = rng.integers(3)
  return labels


def test_map_of_perfect_detections_is_one_and_of_shifted_ones_lower():
  labels = _some_labels()
  perfect = tasks.coco_map(_detections_of(labels), labels)
  assert perfect == pytest.approx({"map": 1.0, "map_50": 1.0, "map_75": 1.0})
  # Moved right by a fifth of its width, each box overlaps its object by
  # IoU 0.8 / 1.2 = 2/3: a hit at the thresholds 0.5, 0.55, 0.6 and 0.65, a
  # miss at the six from 0.7 to 0.95, so mAP@[.5:.95] = 4/10.
  shifted = tasks.coco_map(_detections_of(labels, shift=0.2), labels)
  assert shifted == pytest.approx({"map": 0.4, "map_50": 1.0, "map_75": 0.0})


def test_map_against_a_hand_computed_average_precision():
  """One class, two images, two objects, three detections ranked true,
  false, true. Precision after each: 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
  COCO's AP interpolates precision (the best at this recall or beyond) at
  the 101 recalls 0, 0.01, ..., 1: 1 for the 51 up to 0.5, 2/3 for the 50
  above, so AP = (51 + 50 * 2/3) / 101 at every IoU threshold (the true
  detections are exact, the false one overlaps nothing)."""
  labels = np.array([[[0.1, 0.1, 0.3, 0.3, 0]], [[0.5, 0.5, 0.8, 0.7, 0]]])
  predictions = np.array([[[0.1, 0.1, 0.3, 0.3, 0, 0.9], [0.6, 0.6, 0.7, 0.7, 0, 0.8]],
                          [[0.5, 0.5, 0.8, 0.7, 0, 0.7], [0.0, 0.0, 0.0, 0.0, 0, 0.0]]])
  want = (51 + 50 * 2 / 3) / 101
  got = tasks.coco_map(predictions, labels)
  assert got == pytest.approx({"map": want, "map_50": want, "map_75": want})


def test_map_names_bad_shapes():
  with pytest.raises(ValueError, match=r"\[images, detections, 6\]"):
    tasks.coco_map(np.zeros((2, 3, 5)), np.zeros((2, 3, 5)))


# --- model --------------------------------------------------------------------------

TINY_MODEL = {"widths": (8, 16), "hidden_dim": 16, "num_encoder_layers": 1,
              "num_decoder_layers": 2, "num_heads": 2, "mlp_dim": 16, "num_queries": 6}


def _tiny_model(**fields):
  config = _detr_config()
  config = override(config, **{f"model.{k}": v for k, v in {**TINY_MODEL, **fields}.items()})
  return models.build(config.model)


def test_model_shapes_sown_cross_attention_and_kernel_independence():
  model = _tiny_model()
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 1))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  outputs, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
      variables, images)
  assert outputs["logits"].shape == (2, 2, 6, 11)
  assert outputs["boxes"].shape == (2, 2, 6, 4)
  boxes = outputs["boxes"]
  assert bool(((boxes[..., 2:] > boxes[..., :2])).all())
  cross = [w for m, w in detection_viz.collect_sown(state["intermediates"], "attention_weights")
           if "cross_attention" in m]
  assert len(cross) == 2 and cross[0].shape == (2, 2, 6, 64)     # 8x8 cells
  np.testing.assert_allclose(np.asarray(cross[-1]).sum(-1), 1.0, atol=1e-5)
  name, heat = detection_viz.cross_attention(state["intermediates"], 2, 6)
  assert heat.shape == (2, 6, 8, 8) and "decoder_1" in name
  reference = _tiny_model(**{"attention.kernel": "reference"})
  again = jax.jit(reference.apply)(variables, images)
  np.testing.assert_allclose(again["logits"], outputs["logits"], atol=1e-5)
  np.testing.assert_allclose(again["boxes"], outputs["boxes"], atol=1e-5)


def test_sine_positions_tell_cells_apart():
  table = models.detection.sine_positions_2d(4, 5, 16)
  assert table.shape == (20, 16)
  assert len({row.tobytes() for row in table}) == 20
  # Rows share the first half (the row code), columns the second.
  np.testing.assert_array_equal(table[0, :8], table[4, :8])
  np.testing.assert_array_equal(table[0, 8:], table[5, 8:])


def test_model_names_bad_inputs():
  model = _tiny_model()
  with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
    model.init(jax.random.key(0), jnp.zeros((64, 64, 1)))
  with pytest.raises(ValueError, match="divide by 4"):
    _tiny_model(hidden_dim=18, num_heads=2).init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)))


def test_drawer_names_a_wrong_shape(tmp_path):
  with pytest.raises(ValueError, match="labels \\[n, objects, 5\\]"):
    detection_viz.draw_detection_examples(str(tmp_path), np.zeros((1, 64, 64, 1)),
                                          np.zeros((1, 5)), np.zeros((1, 4, 6)), {})


# --- the experiment -------------------------------------------------------------------


def test_bad_detection_settings_are_one_line_each():
  from attention_lab.train import validation
  config = override(experiments.get_config("scenes_detr"), **{
      "detection.l1_weight": -1.0, "detection.no_object_weight": 0.0,
      "data.max_objects": 20, "model.num_queries": 0})
  lines = validation.problems(config)
  assert lines == [
      "config.model.num_queries=0: must be a positive integer",
      "config.detection.l1_weight=-1.0: must be a finite number >= 0",
      "config.detection.no_object_weight=0.0: must be a finite number > 0",
  ], lines
  config.model.num_queries = 12
  assert validation.problems(config) == [
      "config.detection.l1_weight=-1.0: must be a finite number >= 0",
      "config.detection.no_object_weight=0.0: must be a finite number > 0",
      "config.data.max_objects=20: must be at most model.num_queries (12): each object "
      "is matched to a query of its own"]

TINY_RUN = {"data.name": "digit_scenes_offline/smoke", "total_steps": 2, "batch_size": 4,
            "eval_batch_size": 32, "log_every": 1, "eval_every": 2, "checkpoint_every": 1,
            "optimizer.warmup_steps": 1, "viz.num_examples": 1,
            **{f"model.{k}": v for k, v in TINY_MODEL.items()}, "model.num_decoder_layers": 1}


@pytest.mark.slow   # suite time; test_run.py's tiny run covers the loop, the units here the task
def test_scenes_detr_trains_evaluates_and_draws(tmp_path, scenes_dir):
  config = experiments.get_config("scenes_detr")
  config.data.data_dir = scenes_dir
  config = override(config, **TINY_RUN)
  workdir = str(tmp_path)
  results = train.train_and_evaluate(config, workdir)
  assert results["step"] == 2
  for name in ("eval_map", "eval_map_50", "eval_map_75", "eval_count_accuracy"):
    assert 0.0 <= results[name] <= 1.0, name
  folder = os.path.join(workdir, "attention")
  for kind in ("boxes", "queries"):
    drawn = sorted(f for f in os.listdir(folder) if f.endswith(f"_{kind}.png"))
    assert len(drawn) == 1, (kind, drawn)
    assert_picture(os.path.join(folder, drawn[0]))
  # --mode=visualize reads the checkpoint back and draws (evaluating it the
  # same way is the loop's, tested with the other tasks).
  paths = train.visualize_checkpoint(config, workdir)
  assert any(p.endswith("_queries.png") for p in paths)


@pytest.mark.slow
def test_scenes_detr_stops_and_resumes_bit_for_bit(tmp_path, scenes_dir):
  """The host matching (a pure callback) keeps a resumed run identical to an
  uninterrupted one. Slow: three tiny runs, one of which the test above
  already does."""
  config = experiments.get_config("scenes_detr")
  config.data.data_dir = scenes_dir
  config = override(config, **{**TINY_RUN, "total_steps": 4, "eval_every": 4})
  results = train_stop_and_resume(config, str(tmp_path / "run"))
  assert results["step"] == 4


@pytest.mark.slow
def test_scenes_detr_reaches_target(tmp_path):
  """The target in docs/results.md: mAP@.5 >= 0.9 on the 1,000 held-out
  scenes, data generated afresh (the time is in docs/results.md)."""
  config = experiments.get_config("scenes_detr")
  config.data.data_dir = str(tmp_path / "tfds")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["eval_map_50"] >= 0.9
