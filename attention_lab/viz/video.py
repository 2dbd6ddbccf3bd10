"""Keyframe pictures: a clip's timeline of keyframe scores against its labels
with the attention across frames, and the chosen frames with the frame
CNN's spatial attention over them.

Shape contracts (what ``models.video.KeyframeDetector`` sows):
``attention_weights`` ``[batch, heads, frames, frames]`` per Transformer
layer; ``channel_weights`` ``[batch, frames]`` of the temporal SE
(``temporal_se``); ``spatial_map`` ``[batch * frames, height, width]`` per
CBAM block of the frame CNN (frames of a clip are consecutive rows).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save
from attention_lab.viz.panels import show_image
from attention_lab.viz.sown import collect_sown

THRESHOLD = 0.5       # the task's keyframe threshold (train.tasks.KEYFRAME_THRESHOLD)
MAX_FRAMES = 8        # frames drawn per clip


def choose_frames(labels: np.ndarray, scores: np.ndarray, limit: int = MAX_FRAMES) -> List[int]:
  """Frames worth a look in one clip: each labelled or predicted keyframe,
  with the frame before it (an event is a change from that frame), in time
  order; the highest-scoring frame when there is none; at most ``limit``.

  Args:
    labels: ``[frames]`` 0/1.
    scores: ``[frames]`` keyframe probabilities.
  """
  events = np.flatnonzero((labels > 0) | (scores >= THRESHOLD))
  if not len(events):
    events = np.asarray([int(np.argmax(scores))])
  chosen = sorted({int(f) for e in events for f in (e - 1, e) if f >= 0})
  return chosen[:limit]


def temporal_attention(intermediates, batch: int, frames: int
                       ) -> Tuple[Optional[str], Optional[np.ndarray]]:
  """``(what, weights)`` of the attention across frames: the last
  Transformer layer's weights averaged over heads ``[batch, frames,
  frames]``, or the temporal SE's frame gates ``[batch, frames]``, or
  ``(None, None)`` when the model has neither."""
  layers = collect_sown(intermediates, "attention_weights")
  if layers:
    module, weights = layers[-1]
    if weights.shape[0] != batch or weights.shape[-2:] != (frames, frames):
      raise ValueError(f"attention_weights sown by {module} has shape {weights.shape}; "
                       f"expected [{batch}, heads, {frames}, {frames}]")
    return f"{module}: attention across frames, mean of heads", weights.mean(axis=1)
  gates = [(m, w) for m, w in collect_sown(intermediates, "channel_weights")
           if "temporal_se" in m]
  if gates:
    module, weights = gates[-1]
    if weights.shape != (batch, frames):
      raise ValueError(f"channel_weights sown by {module} has shape {weights.shape}; "
                       f"expected [{batch}, {frames}] (one gate per frame)")
    return "temporal SE frame gates", weights
  return None, None


def spatial_maps(intermediates, batch: int, frames: int) -> Optional[np.ndarray]:
  """The first CBAM block's spatial map per frame ``[batch, frames, h, w]``
  (the finest grid), or None without CBAM."""
  maps = collect_sown(intermediates, "spatial_map")
  if not maps:
    return None
  module, heat = maps[0]
  if heat.ndim != 3 or heat.shape[0] != batch * frames:
    raise ValueError(f"spatial_map sown by {module} has shape {heat.shape}; expected "
                     f"[{batch} clips * {frames} frames, height, width]")
  return heat.reshape((batch, frames) + heat.shape[1:])


def draw_timeline(labels, scores, attention, attention_name, path: str,
                  title: str) -> Pictures:
  """Scores ``[frames]`` against labels ``[frames]`` over time, above the
  attention across frames (``[frames, frames]`` as a map, ``[frames]`` as
  bars, or None)."""
  frames = len(labels)
  rows = 1 if attention is None else 2
  heights = [1.0] if attention is None else [1.0, 2.2 if attention.ndim == 2 else 0.8]
  fig, axes = plt.subplots(rows, 1, figsize=(6.4, 2.0 + 2.2 * (rows - 1)), dpi=100,
                           squeeze=False, gridspec_kw={"height_ratios": heights})
  ax = axes[0, 0]
  for f in np.flatnonzero(labels > 0):
    ax.axvspan(f - 0.5, f + 0.5, color="tab:green", alpha=0.3, lw=0)
  ax.plot(np.arange(frames), scores, "o-", ms=3, color="tab:blue", label="keyframe score")
  ax.axhline(THRESHOLD, color="grey", ls="--", lw=0.8)
  ax.set_xlim(-0.5, frames - 0.5)
  ax.set_ylim(-0.02, 1.02)
  ax.set_ylabel("score", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.set_title(f"{title}\nscores (blue) and labelled keyframes (green)", fontsize=8)
  if attention is not None:
    ax = axes[1, 0]
    if attention.ndim == 2:
      ax.imshow(attention, cmap="viridis", aspect="auto",
                extent=(-0.5, frames - 0.5, frames - 0.5, -0.5))
      ax.set_ylabel("query frame", fontsize=8)
    else:
      ax.bar(np.arange(frames), attention, width=0.9, color="tab:purple")
      ax.set_ylim(0, 1)
      ax.set_xlim(-0.5, frames - 0.5)
      ax.set_ylabel("gate", fontsize=8)
    ax.set_xlabel("frame" if attention.ndim == 1 else "key frame", fontsize=8)
    ax.set_title(attention_name, fontsize=8)
    ax.tick_params(labelsize=7)
  fig.tight_layout()
  return save(fig, path)


def draw_frames(video, labels, scores, chosen: List[int], heat, path: str,
                title: str) -> Pictures:
  """The ``chosen`` frames of ``video [frames, height, width, 1]``, each with
  its score and label, and ``heat [frames, h, w]`` (spatial attention,
  stretched to each frame's range) over it when given."""
  height, width = video.shape[1:3]
  fig, axes = plt.subplots(1, len(chosen), figsize=(1.6 * len(chosen) + 0.4, 2.1),
                           dpi=100, squeeze=False)
  for ax, f in zip(axes[0], chosen):
    show_image(ax, video[f])
    if heat is not None:
      ax.imshow(heat[f], cmap="inferno", alpha=0.5, interpolation="bilinear",
                extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    mark = "KEY " if labels[f] else ""
    ax.set_title(f"{mark}t={f}\nscore {scores[f]:.2f}", fontsize=7,
                 color="tab:green" if labels[f] else "black")
  suffix = ": spatial attention (CBAM, first block)" if heat is not None else ""
  fig.suptitle(title + suffix, fontsize=8)
  fig.tight_layout()
  return save(fig, path)


def draw_video_examples(out_dir, inputs, labels, predictions, intermediates,
                        vocabulary=None, class_names=None) -> Pictures:
  """Per clip of ``inputs [n, frames, height, width, 1]`` with ``labels``
  and keyframe probabilities ``predictions`` ``[n, frames]``: the timeline
  with the temporal attention, and the chosen frames with spatial attention."""
  del vocabulary, class_names  # frames have neither
  inputs, labels, predictions = map(np.asarray, (inputs, labels, predictions))
  if inputs.ndim != 5 or labels.shape != inputs.shape[:2] or predictions.shape != labels.shape:
    raise ValueError(f"draw_video_examples expects inputs [n, frames, height, width, 1] "
                     f"with labels and predictions [n, frames]; got {inputs.shape}, "
                     f"{labels.shape}, {predictions.shape}")
  n, frames = labels.shape
  attention_name, attention = temporal_attention(intermediates, n, frames)
  heat = spatial_maps(intermediates, n, frames)
  pictures: Pictures = {}
  for i in range(n):
    tag = f"example{i}_keyframes{int(labels[i].sum())}"
    title = (f"clip {i}: keyframes at {np.flatnonzero(labels[i]).tolist()}, predicted at "
             f"{np.flatnonzero(predictions[i] >= THRESHOLD).tolist()}")
    pictures.update(draw_timeline(labels[i], predictions[i],
                                  None if attention is None else attention[i], attention_name,
                                  os.path.join(out_dir, f"{tag}_timeline.png"), title))
    pictures.update(draw_frames(inputs[i], labels[i], predictions[i],
                                choose_frames(labels[i], predictions[i]),
                                None if heat is None else heat[i],
                                os.path.join(out_dir, f"{tag}_frames.png"), f"clip {i}"))
  return pictures


__all__ = ["choose_frames", "draw_frames", "draw_timeline", "draw_video_examples",
           "spatial_maps", "temporal_attention"]
