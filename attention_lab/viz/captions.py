"""Captioning pictures, as in "Show, Attend and Tell"'s figures: the image,
then for every word the model wrote, the image under that word's attention
over the grid of regions.

Shape contract: ``inputs`` is ``{"image": [batch, height, width, channels]}``;
the model sows either ``alignment`` ``[batch, caption_length, regions]`` (the
LSTM's soft attention, ``models.captioning.ShowAttendTell``) or, per decoder
layer, ``.../cross_attention/attention_weights`` ``[batch, heads,
caption_length, regions]`` (``TransformerCaptioner``: the last layer's heads
averaged are drawn). ``regions`` is a square grid over the image, row-major.
``labels`` and ``predictions`` are word ids ``[batch, caption_length]``.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save
from attention_lab.viz.panels import show_image
from attention_lab.viz.sown import collect_sown
from attention_lab.viz.translation import cross_attention_layers

WORDS_PER_ROW = 8


def caption_attention(intermediates) -> np.ndarray:
  """Attention per written word over the regions, ``[batch, caption_length,
  regions]``: the sown ``alignment``, else the last cross-attention layer's
  heads averaged.

  Raises:
    ValueError: nothing of either kind sown, or an array of another shape,
      or regions that are not a square grid; naming what was found.
  """
  sown = collect_sown(intermediates, "alignment")
  if sown:
    module, weights = sown[-1]
    module = module or "the model"
  else:
    cross = [w for m, w in collect_sown(intermediates, "attention_weights")
             if "cross_attention" in m.split("/")]
    if not cross:
      raise ValueError("caption pictures need a sown 'alignment' [batch, caption_length, "
                       "regions] or decoder cross_attention weights; found neither")
    module, layer = cross_attention_layers(intermediates, cross[-1].shape[-1])[-1]
    weights = layer.mean(axis=1)
  if weights.ndim != 3:
    raise ValueError(f"caption attention from {module} has shape {weights.shape}; "
                     "expected [batch, caption_length, regions]")
  side = math.isqrt(weights.shape[-1])
  if side * side != weights.shape[-1]:
    raise ValueError(f"caption attention from {module} covers {weights.shape[-1]} regions, "
                     "not a square grid")
  return weights


def draw_caption_attention(image: np.ndarray, words: Sequence[str], weights: np.ndarray,
                           path: str, title: str) -> Pictures:
  """The image, then one panel per word: the image under that word's
  attention (``weights`` ``[len(words), regions]``, a square grid stretched
  over the image and smoothed bilinearly, as the paper draws it).

  Args:
    image: ``[height, width, channels]`` in [0, 1].
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 2 or weights.shape[0] != len(words):
    raise ValueError(f"draw_caption_attention: weights {weights.shape} do not match "
                     f"{len(words)} words; expected [{len(words)}, regions]")
  side = math.isqrt(weights.shape[1])
  if side * side != weights.shape[1]:
    raise ValueError(f"draw_caption_attention: {weights.shape[1]} regions are not a square grid")
  height, width = image.shape[:2]
  panels = len(words) + 1
  cols = min(WORDS_PER_ROW, panels)
  rows = -(-panels // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.4 * rows + 0.4), dpi=100,
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  show_image(axes[0, 0], image)
  axes[0, 0].set_title("input", fontsize=8)
  extent = (-0.5, width - 0.5, height - 0.5, -0.5)
  grey = image[..., 0] if image.shape[-1] == 1 else image.mean(-1)
  for k, word in enumerate(words):
    ax = axes.flat[k + 1]
    ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0)
    grid = weights[k].reshape(side, side)
    ax.imshow(grid, cmap="inferno", alpha=0.6, extent=extent, interpolation="bilinear",
              vmin=0.0, vmax=max(float(grid.max()), 1e-9))
    ax.set_title(sequences.printable(word), fontsize=9)
  fig.suptitle(title, fontsize=8, wrap=True)
  fig.tight_layout()
  return save(fig, path)


def draw_caption_examples(out_dir, inputs, labels, predictions, intermediates,
                          vocabulary=None, class_names=None) -> Pictures:
  """Per example ``example{i}_caption_attention.png``: the written caption,
  word by word, each word's attention over the image."""
  del class_names  # captions have no classes
  if vocabulary is None:
    raise ValueError("draw_caption_examples needs the dataset's vocabulary")
  if not isinstance(inputs, dict) or "image" not in inputs:
    raise ValueError(f"draw_caption_examples: inputs are {type(inputs).__name__}; expected "
                     "a dict with 'image' [batch, height, width, channels]")
  images = np.asarray(inputs["image"])
  weights = caption_attention(intermediates)
  if weights.shape[0] != len(images):
    raise ValueError(f"draw_caption_examples: attention for {weights.shape[0]} examples, "
                     f"{len(images)} images")
  pictures: Pictures = {}
  for i in range(len(images)):
    words = sequences.tokens_of(predictions[i], vocabulary)
    if not words:
      continue                              # nothing written: nothing to draw
    reference = sequences.tokens_of(labels[i], vocabulary)
    text = " ".join(w for w in words if w != "<eos>")
    if words == reference:
      title = f"{text} (right)"
    else:
      title = f"{text} (wrong; reference: {' '.join(w for w in reference if w != '<eos>')})"
    pictures.update(draw_caption_attention(
        images[i], words, weights[i, :len(words)],
        os.path.join(out_dir, f"example{i}_caption_attention.png"), title))
  return pictures


__all__ = ["caption_attention", "draw_caption_attention", "draw_caption_examples"]
