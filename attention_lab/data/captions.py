"""Captioned digit scenes: the offline image-captioning task ("Show, Attend
and Tell" on MNIST digits).

A scene is a 64x64 grey canvas cut into four quadrants; two to four of them
hold one MNIST digit each, drawn small (14 to 18 pixels) or large (24 to 30
pixels) at a random place inside its quadrant. The caption is a function of
the scene, from this grammar:

    caption  := phrase ("and" phrase)*           phrases in reading order:
    phrase   := "a" size digit "at the" place    top left, top right,
    size     := "small" | "large"                bottom left, bottom right
    place    := ("top" | "bottom") ("left" | "right")

for example ``a large 3 at the top left and a small 7 at the bottom right``.
Every word is fixed by what is drawn (the quadrant and size class of each
digit and its class), so the caption is determined by the scene, and the
reading order lets a decoder look at one quadrant after the other.

A split is a pure function of its digit pool and a seed. The builder
(``builders/mnist_captions_offline.py``) draws train scenes only from the
4,000 ``mnist_offline`` training digits and test scenes only from its 1,000
held-out ones, so a test scene never shows a digit image seen in training.

Batches hold ``inputs`` ``{"image": float32 [batch, 64, 64, 1] in [0, 1],
"target": int32 [batch, TARGET_LENGTH]}`` and ``label`` = the target word
ids (``<eos>`` then padding), read by the model only for teacher forcing.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from attention_lab.data import characters
from attention_lab.data.pipeline import Arrays

CANVAS = 64
QUADRANT = CANVAS // 2
# (row, column) of each quadrant in reading order: the order of the phrases.
QUADRANTS = ((0, 0), (0, 1), (1, 0), (1, 1))
PLACES = ("top left", "top right", "bottom left", "bottom right")
SIZE_WORDS = ("small", "large")
# Drawn side of a digit's 28x28 MNIST box, per size class (inclusive). The
# classes are far apart, so the size word is visible; the large side stays
# inside a 32-pixel quadrant.
SIDES = ((14, 18), (24, 30))
MIN_DIGITS, MAX_DIGITS = 2, 4

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
WORDS = SPECIAL_TOKENS + ("a", "and", "at", "the", "small", "large", "top", "bottom", "left",
                          "right") + tuple(str(d) for d in range(10))
WORD_IDS = {w: i for i, w in enumerate(WORDS)}
PHRASE_WORDS = 7                       # a large 3 at the top left
# Four phrases, three "and", one <eos>.
TARGET_LENGTH = MAX_DIGITS * PHRASE_WORDS + MAX_DIGITS - 1 + 1


def phrase(label: int, size_class: int, quadrant: int) -> str:
  """``a {size} {digit} at the {place}``."""
  return f"a {SIZE_WORDS[size_class]} {label} at the {PLACES[quadrant]}"


def caption(labels: Sequence[int], size_classes: Sequence[int]) -> str:
  """The caption of a scene given per quadrant (reading order): ``labels``
  and ``size_classes`` ``[4]``, -1 where the quadrant is empty."""
  if len(labels) != len(QUADRANTS) or len(size_classes) != len(QUADRANTS):
    raise ValueError(f"caption: labels and size_classes need one entry per quadrant "
                     f"({len(QUADRANTS)}), got {len(labels)} and {len(size_classes)}")
  phrases = [phrase(int(l), int(s), q) for q, (l, s) in enumerate(zip(labels, size_classes))
             if l >= 0]
  if not MIN_DIGITS <= len(phrases) <= MAX_DIGITS:
    raise ValueError(f"caption: a scene holds {MIN_DIGITS} to {MAX_DIGITS} digits, "
                     f"got {len(phrases)}")
  return " and ".join(phrases)


def resize_digit(digit: np.ndarray, side: int) -> np.ndarray:
  """``uint8 [28, 28]`` -> float32 ``[side, side]`` in [0, 1], resized by
  Pillow with its antialiasing bilinear filter (a well-kept resampler rather
  than our own)."""
  from PIL import Image  # late: only preparing scenes needs it
  image = Image.fromarray(np.asarray(digit, np.uint8)).resize((side, side),
                                                              Image.Resampling.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def make_scenes(digits: np.ndarray, labels: np.ndarray, count: int, seed) -> Dict[str, np.ndarray]:
  """``count`` scenes from a digit pool.

  Args:
    digits: ``uint8 [pool, 28, 28]``.
    labels: ``[pool]`` digit classes.
    count: scenes to draw.
    seed: scene ``i`` is drawn by ``numpy.random.default_rng([*seed, i])``,
      so any scene can be regenerated alone.

  Returns:
    ``image`` uint8 ``[count, 64, 64, 1]``; ``caption`` (a list of str);
    per quadrant in reading order (-1 where empty): ``labels``,
    ``size_classes`` (0 small, 1 large), ``sources`` (indices into the pool)
    int64 ``[count, 4]``, and ``boxes`` int64 ``[count, 4, 4]`` (top, left,
    height, width in pixels).
  """
  digits, labels = np.asarray(digits), np.asarray(labels)
  if digits.ndim != 3 or digits.shape[1:] != (28, 28) or len(labels) != len(digits):
    raise ValueError(f"make_scenes: expects digits [pool, 28, 28] and labels [pool], got "
                     f"{digits.shape} and {labels.shape}")
  if len(digits) < MAX_DIGITS:
    raise ValueError(f"make_scenes: a pool of {len(digits)} digits cannot fill "
                     f"{MAX_DIGITS} quadrants")
  seed = list(np.atleast_1d(seed))
  images = np.zeros((count, CANVAS, CANVAS, 1), np.uint8)
  per_quadrant = {k: np.full((count, len(QUADRANTS)), -1, np.int64)
                  for k in ("labels", "size_classes", "sources")}
  boxes = np.full((count, len(QUADRANTS), 4), -1, np.int64)
  captions: List[str] = []
  for i in range(count):
    rng = np.random.default_rng(seed + [i])
    k = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    quadrants = rng.choice(len(QUADRANTS), k, replace=False)
    chosen = rng.choice(len(digits), k, replace=False)
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    for q, d in zip(quadrants.tolist(), chosen.tolist()):
      size_class = int(rng.integers(len(SIDES)))
      side = int(rng.integers(SIDES[size_class][0], SIDES[size_class][1] + 1))
      row, col = QUADRANTS[q]
      top = row * QUADRANT + int(rng.integers(0, QUADRANT - side + 1))
      left = col * QUADRANT + int(rng.integers(0, QUADRANT - side + 1))
      patch = canvas[top:top + side, left:left + side]
      np.maximum(patch, resize_digit(digits[d], side), out=patch)
      per_quadrant["labels"][i, q] = labels[d]
      per_quadrant["size_classes"][i, q] = size_class
      per_quadrant["sources"][i, q] = d
      boxes[i, q] = (top, left, side, side)
    images[i, ..., 0] = np.round(canvas * 255.0).astype(np.uint8)
    captions.append(caption(per_quadrant["labels"][i], per_quadrant["size_classes"][i]))
  return {"image": images, "caption": captions, "boxes": boxes, **per_quadrant}


def encode(captions: Sequence[str], length: int = TARGET_LENGTH) -> np.ndarray:
  """Word ids ``int32 [len(captions), length]``, each caption then ``<eos>``
  then padding; a word outside ``WORDS`` or a caption that does not fit is a
  ``ValueError`` naming it."""
  return characters.encode([c.split() for c in captions], length, WORD_IDS, add_eos=True)


def decode(ids: Sequence[int]) -> str:
  """The caption of one row of word ids, up to its first ``<eos>``."""
  words = []
  for i in np.asarray(ids).tolist():
    if i == characters.EOS_ID:
      break
    if i not in (characters.PAD_ID, characters.BOS_ID):
      words.append(WORDS[i])
  return " ".join(words)


def _strings(values) -> list:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def caption_inputs(split: Arrays, data_config=None) -> Arrays:
  """TFDS ``image``/``caption`` features -> ``{"inputs": {"image", "target"},
  "label"}`` (shapes in the module docstring)."""
  del data_config  # scenes need no per-experiment shaping
  target = encode(_strings(split["caption"]))
  return {"inputs": {"image": split["image"].astype(np.float32) / 255.0, "target": target},
          "label": target}
