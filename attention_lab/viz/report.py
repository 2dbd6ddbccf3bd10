"""Pictures of a run: training curves and what the model attends to.

Every function writes PNG files and returns ``{path: rgb uint8 array}`` so the
same pictures can go to TensorBoard.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List

import numpy as np

import matplotlib
matplotlib.use("Agg")  # files only; no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from attention_lab.viz.rollout import attention_rollout  # noqa: E402
from attention_lab.viz.rollout import tokens_to_grid  # noqa: E402
from attention_lab.viz.rollout import upsample  # noqa: E402

Pictures = Dict[str, np.ndarray]


def _save(fig, path: str) -> Pictures:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  fig.savefig(path, dpi=fig.dpi)
  plt.close(fig)
  return {path: image}


def _natural_key(path):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def collect_attention(intermediates) -> List[np.ndarray]:
  """Sown ``attention_weights`` in layer order (``block_2`` before ``block_10``).

  Returns:
    list of ``[batch, heads, q_length, kv_length]`` arrays.
  """
  import jax  # late: keeps this module importable for plotting alone
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    name = jax.tree_util.keystr(path)
    if "attention_weights" in name:
      found.append((name, np.asarray(leaf)))
  found.sort(key=lambda item: _natural_key(item[0]))
  return [w for _, w in found]


def draw_curves(history: List[dict], path: str) -> Pictures:
  """Loss and accuracy against steps, train and eval."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
  for split, style in (("train", "-"), ("eval", "o-")):
    rows = [r for r in history if r["split"] == split]
    if not rows:
      continue
    steps = [r["step"] for r in rows]
    for ax, metric in zip(axes, ("loss", "accuracy")):
      if metric in rows[0]:
        ax.plot(steps, [r[metric] for r in rows], style, label=split, markersize=3)
  for ax, metric in zip(axes, ("loss", "accuracy")):
    ax.set_xlabel("step")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return _save(fig, path)


def draw_head_grid(layer_weights: List[np.ndarray], example: int, path: str,
                   title: str = "") -> Pictures:
  """Query x key heat maps: one row per layer, one column per head."""
  layers = len(layer_weights)
  heads = layer_weights[0].shape[1]
  fig, axes = plt.subplots(layers, heads, figsize=(1.8 * heads, 1.8 * layers),
                           dpi=100, squeeze=False)
  for l, weights in enumerate(layer_weights):
    for h in range(heads):
      ax = axes[l, h]
      ax.imshow(weights[example, h], cmap="viridis", vmin=0.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if l == 0:
        ax.set_title(f"head {h}", fontsize=8)
      if h == 0:
        ax.set_ylabel(f"layer {l}", fontsize=8)
  fig.suptitle(title or "attention weights (query rows x key columns)", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def draw_image_overlay(image: np.ndarray, cls_map: np.ndarray,
                       rollout_map: np.ndarray, path: str, title: str) -> Pictures:
  """The input, the CLS token's last-layer attention and the rollout over it."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  cmap = "gray" if image.ndim == 2 else None
  fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8), dpi=100)
  panels = (("input", None), ("CLS attention, last layer", cls_map),
            ("attention rollout", rollout_map))
  for ax, (name, heat) in zip(axes, panels):
    ax.imshow(image, cmap=cmap)
    if heat is not None:
      ax.imshow(heat, cmap="inferno", alpha=0.55)
    ax.set_title(name, fontsize=8)
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def draw_image_examples(out_dir, inputs, labels, predictions, attention) -> Pictures:
  """ViT pictures: a head grid and a CLS/rollout overlay per example."""
  pictures: Pictures = {}
  if not attention:
    return pictures
  height, width = inputs.shape[1:3]
  rollout = attention_rollout(attention)                     # [batch, t, t]
  last_cls = attention[-1][:, :, 0, 1:].mean(axis=1)          # [batch, patches]
  for i in range(len(inputs)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    cls_map = upsample(tokens_to_grid(last_cls[i], height, width), height, width)
    roll_map = upsample(tokens_to_grid(rollout[i, 0, 1:], height, width), height, width)
    pictures.update(draw_image_overlay(
        inputs[i], cls_map, roll_map, os.path.join(out_dir, f"{tag}_overlay.png"),
        f"label {labels[i]}, predicted {predictions[i]}"))
    pictures.update(draw_head_grid(
        attention, i, os.path.join(out_dir, f"{tag}_heads.png")))
  return pictures


DRAWERS = {
    "image": draw_image_examples,
}


def draw_examples(kind: str, out_dir: str, **arrays) -> Pictures:
  """Draws the pictures of ``kind`` (``config.viz.kind``) into ``out_dir``."""
  if kind not in DRAWERS:
    raise ValueError(f"unknown viz kind {kind!r}; known: {', '.join(sorted(DRAWERS))}")
  return DRAWERS[kind](out_dir, **arrays)
