"""Panels more than one drawer uses: the input image and the query x key
head grid of every layer."""

from __future__ import annotations

from typing import List

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save


def show_image(ax, image: np.ndarray) -> None:
  """``[height, width, channels]`` on ``ax``, grey when it has one channel."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
  ax.axis("off")


def draw_input_image(image: np.ndarray, path: str, title: str) -> Pictures:
  """The input image ``[height, width, channels]`` alone, for the index page."""
  fig, ax = plt.subplots(figsize=(2.2, 2.4), dpi=100)
  show_image(ax, image)
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  return save(fig, path)


def draw_head_grid(layer_weights: List[np.ndarray], example: int, path: str,
                   title: str = "", tokens=None) -> Pictures:
  """Query x key heat maps: one row per layer, one column per head.

  Args:
    layer_weights: per layer ``[batch, heads, q_length, kv_length]``.
    example: which batch entry to draw.
    tokens: optional token strings (self-attention: one per position) to
      label the axes with, when there are few enough to read.
  """
  for l, weights in enumerate(layer_weights):
    if weights.ndim != 4:
      raise ValueError(f"draw_head_grid: layer {l} weights have shape {weights.shape}; "
                       "expected [batch, heads, q_length, kv_length]")
  layers = len(layer_weights)
  heads = layer_weights[0].shape[1]
  labelled = tokens is not None and len(tokens) <= sequences.MAX_LABELLED_TOKENS
  side = 1.8 if not labelled else max(1.8, 0.12 * len(tokens) + 0.8)
  fig, axes = plt.subplots(layers, heads, figsize=(side * heads, side * layers),
                           dpi=100, squeeze=False)
  for l, weights in enumerate(layer_weights):
    for h in range(heads):
      ax = axes[l, h]
      ax.imshow(weights[example, h], cmap="viridis", vmin=0.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if labelled:
        names = [sequences.printable(t) for t in tokens]
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(names, fontsize=5, rotation=90)
        ax.set_yticks(np.arange(len(names)))
        ax.set_yticklabels(names, fontsize=5)
      if l == 0:
        ax.set_title(f"head {h}", fontsize=8)
      if h == 0:
        ax.set_ylabel(f"layer {l}", fontsize=8)
  fig.suptitle(title or "attention weights (query rows x key columns)", fontsize=9)
  fig.tight_layout()
  return save(fig, path)


__all__ = ["draw_head_grid", "draw_input_image", "show_image"]
