"""Detection pictures: predicted against true boxes, and where each object
query of the DETR decoder looks.

Shape contracts (what ``models.detection.DETR`` sows and the detection task
predicts): ``attention_weights`` ``[batch, heads, queries, cells]`` of every
decoder layer's ``cross_attention`` (cells: the backbone's square grid, row
by row); labels ``[batch, objects, 5]`` (ymin, xmin, ymax, xmax normalised,
class; class -1 pads); predictions ``[batch, queries, 6]`` (box, class,
score).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save
from attention_lab.viz.panels import show_image
from attention_lab.viz.sown import collect_sown

THRESHOLD = 0.5       # the task's detection threshold (train.tasks.DETECTION_THRESHOLD)


def cross_attention(intermediates, batch: int, queries: int
                    ) -> Tuple[Optional[str], Optional[np.ndarray]]:
  """``(module, weights [batch, queries, side, side])``: the last decoder
  layer's cross-attention averaged over heads, each query's weights laid
  out on the feature grid; ``(None, None)`` when none was sown."""
  layers = [(m, w) for m, w in collect_sown(intermediates, "attention_weights")
            if "cross_attention" in m]
  if not layers:
    return None, None
  module, weights = layers[-1]
  cells = weights.shape[-1]
  side = int(round(np.sqrt(cells)))
  if weights.ndim != 4 or weights.shape[0] != batch or weights.shape[2] != queries \
      or side * side != cells:
    raise ValueError(f"attention_weights sown by {module} has shape {weights.shape}; "
                     f"expected [{batch}, heads, {queries}, cells] over a square grid")
  return module, weights.mean(axis=1).reshape(batch, queries, side, side)


def _box(ax, box, size, color, text, style="-"):
  """A normalised (ymin, xmin, ymax, xmax) box on an image of ``size`` (h, w)."""
  height, width = size
  top, left, bottom, right = box[0] * height, box[1] * width, box[2] * height, box[3] * width
  ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), right - left, bottom - top,
                             fill=False, edgecolor=color, linewidth=1.2, linestyle=style))
  ax.text(left - 0.5, top - 1.0, text, color=color, fontsize=6, va="bottom")


def _name(label: int, class_names) -> str:
  return class_names[label] if class_names is not None else str(label)


def draw_boxes(image, labels, predictions, path: str, title: str,
               class_names=None) -> Pictures:
  """``image [height, width, channels]`` twice: the true boxes ``labels
  [objects, 5]`` (green) and the detections of ``predictions [queries, 6]``
  scoring at least ``THRESHOLD`` (red, class and score)."""
  size = image.shape[:2]
  fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.9), dpi=100)
  for ax, which in zip(axes, ("true", "predicted")):
    show_image(ax, image)
    ax.set_title(which, fontsize=8)
  for row in labels[labels[:, 4] >= 0]:
    _box(axes[0], row[:4], size, "lime", _name(int(row[4]), class_names))
  for row in predictions[predictions[:, 5] >= THRESHOLD]:
    _box(axes[1], row[:4], size, "red", f"{_name(int(row[4]), class_names)} {row[5]:.2f}")
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  return save(fig, path)


def draw_query_attention(image, predictions, heat, path: str, title: str,
                         class_names=None) -> Pictures:
  """One panel per object query, by descending score: ``heat [queries, side,
  side]`` (its cross-attention) stretched over ``image`` with the query's
  box (solid when it scores at least ``THRESHOLD``, dashed otherwise)."""
  size = image.shape[:2]
  order = np.argsort(-predictions[:, 5], kind="stable")
  columns = min(6, len(order))
  rows = -(-len(order) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns + 0.2, 1.65 * rows + 0.4),
                           dpi=100, squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, query in zip(axes.flat, order):
    show_image(ax, image)
    ax.imshow(heat[query], cmap="inferno", alpha=0.55, interpolation="bilinear",
              extent=(-0.5, size[1] - 0.5, size[0] - 0.5, -0.5))
    row = predictions[query]
    found = row[5] >= THRESHOLD
    _box(ax, row[:4], size, "cyan" if found else "grey", "", "-" if found else "--")
    ax.set_title(f"q{query}: {_name(int(row[4]), class_names)} {row[5]:.2f}", fontsize=7,
                 color="black" if found else "grey")
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  return save(fig, path)


def draw_detection_examples(out_dir, inputs, labels, predictions, intermediates,
                            vocabulary=None, class_names=None) -> Pictures:
  """Per image of ``inputs [n, height, width, channels]``: predicted against
  true boxes, and each query's cross-attention (last decoder layer, mean of
  heads) over the image."""
  del vocabulary  # images have no tokens
  inputs, labels, predictions = map(np.asarray, (inputs, labels, predictions))
  if inputs.ndim != 4 or labels.ndim != 3 or labels.shape[-1] != 5 \
      or predictions.ndim != 3 or predictions.shape[-1] != 6 \
      or not len(inputs) == len(labels) == len(predictions):
    raise ValueError(f"draw_detection_examples expects inputs [n, height, width, channels], "
                     f"labels [n, objects, 5] and predictions [n, queries, 6]; got "
                     f"{inputs.shape}, {labels.shape}, {predictions.shape}")
  n, queries = predictions.shape[:2]
  module, heat = cross_attention(intermediates, n, queries)
  pictures: Pictures = {}
  for i in range(n):
    objects = int((labels[i, :, 4] >= 0).sum())
    found = int((predictions[i, :, 5] >= THRESHOLD).sum())
    tag = f"example{i}_objects{objects}"
    title = f"scene {i}: {objects} objects, {found} detections scoring >= {THRESHOLD}"
    pictures.update(draw_boxes(inputs[i], labels[i], predictions[i],
                               os.path.join(out_dir, f"{tag}_boxes.png"), title, class_names))
    if heat is not None:
      pictures.update(draw_query_attention(
          inputs[i], predictions[i], heat[i], os.path.join(out_dir, f"{tag}_queries.png"),
          f"scene {i}: each query's cross-attention ({module}, mean of heads)",
          class_names))
  return pictures


__all__ = ["cross_attention", "draw_boxes", "draw_detection_examples",
           "draw_query_attention"]
