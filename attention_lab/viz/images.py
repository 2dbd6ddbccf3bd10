"""Image Transformer pictures (ViT, pixel Transformer): a head grid and the
last layer's and the rollout's attention over the image, per example.

Shape contract: the attention covers the image's patch grid, optionally after
one CLS token. A model does not say which, so ``cls_tokens`` tells them apart
by whether ``tokens - 1`` patches tile the image (CLS first) or ``tokens`` do.
"""

from __future__ import annotations

import os

import numpy as np

from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save
from attention_lab.viz.panels import draw_head_grid
from attention_lab.viz.panels import draw_input_image
from attention_lab.viz.rollout import attention_rollout
from attention_lab.viz.rollout import tokens_to_grid
from attention_lab.viz.rollout import upsample
from attention_lab.viz.sown import split_attention


def _tiles(n: int, height: int, width: int) -> bool:
  """Whether ``n`` patch tokens tile a ``height x width`` image."""
  if n < 1:
    return False
  try:
    tokens_to_grid(np.zeros(n), height, width)
    return True
  except ValueError:
    return False


def cls_tokens(tokens: int, height: int, width: int) -> int:
  """1 when ``tokens`` are a CLS token then the patch grid of a
  ``height x width`` image, 0 when they are the patch grid alone.

  Raises:
    ValueError: when neither tiles the image.
  """
  if _tiles(tokens - 1, height, width):
    return 1
  if _tiles(tokens, height, width):
    return 0
  raise ValueError(f"image attention over {tokens} tokens: neither {tokens} nor "
                   f"{tokens - 1} (after a CLS token) patches tile a {height}x{width} image")


def draw_image_overlay(image: np.ndarray, cls_map: np.ndarray,
                       rollout_map: np.ndarray, path: str, title: str) -> Pictures:
  """The input ``[height, width, channels]``, the CLS token's last-layer
  attention and the rollout ``[height, width]`` each over it."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  cmap = "gray" if image.ndim == 2 else None
  fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8), dpi=100)
  panels = (("input", None), ("attention, last layer", cls_map),
            ("attention rollout", rollout_map))
  for ax, (name, heat) in zip(axes, panels):
    ax.imshow(image, cmap=cmap)
    if heat is not None:
      ax.imshow(heat, cmap="inferno", alpha=0.55)
    ax.set_title(name, fontsize=8)
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return save(fig, path)


def draw_image_examples(out_dir, inputs, labels, predictions, intermediates,
                        vocabulary=None, class_names=None) -> Pictures:
  """Pictures of images ``inputs`` ``[batch, height, width, channels]``.

  With a CLS token (see ``cls_tokens``) the maps are the CLS row; with mean
  pooling, the average row (what all tokens attend to).
  """
  pictures: Pictures = {}
  attention = split_attention(intermediates).heads
  if not attention:
    return pictures
  if np.ndim(inputs) != 4:
    raise ValueError(f"draw_image_examples: inputs have shape {np.shape(inputs)}; "
                     "expected images [batch, height, width, channels]")
  height, width = inputs.shape[1:3]
  rollout = attention_rollout(attention)                     # [batch, t, t]
  last = attention[-1].mean(axis=1)                          # [batch, t, t]
  if cls_tokens(last.shape[-1], height, width):
    last_row, roll_row = last[:, 0, 1:], rollout[:, 0, 1:]
  else:
    last_row, roll_row = last.mean(axis=1), rollout.mean(axis=1)
  for i in range(len(inputs)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    pictures.update(draw_input_image(inputs[i], os.path.join(out_dir, f"{tag}_input.png"),
                                     f"label {labels[i]}, predicted {predictions[i]}"))
    cls_map = upsample(tokens_to_grid(last_row[i], height, width), height, width)
    roll_map = upsample(tokens_to_grid(roll_row[i], height, width), height, width)
    pictures.update(draw_image_overlay(
        inputs[i], cls_map, roll_map, os.path.join(out_dir, f"{tag}_overlay.png"),
        f"label {labels[i]}, predicted {predictions[i]}"))
    pictures.update(draw_head_grid(
        attention, i, os.path.join(out_dir, f"{tag}_heads.png")))
  return pictures


__all__ = ["cls_tokens", "draw_image_examples", "draw_image_overlay"]
