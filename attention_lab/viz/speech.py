"""Speech classifier pictures: the log-mel spectrogram with the model's
attention over time beneath it, and the head grid of the self-attention layers.

Shape contract: the front end sows ``spectrogram`` ``[batch, frames, mels]``;
self-attention covers one token per frame after a CLS token (KWT), or fewer,
subsampled positions (Conformer, which pools with attention ``[batch, 1, t]``).
Attention over ``t`` subsampled positions is spread back onto the frames.
"""

from __future__ import annotations

import os
from typing import Dict

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.panels import draw_head_grid
from attention_lab.viz.rollout import attention_rollout
from attention_lab.viz.sown import collect_sown
from attention_lab.viz.sown import pooled_weights
from attention_lab.viz.sown import split_attention


def spread_over_frames(weights: np.ndarray, frames: int) -> np.ndarray:
  """Weights over ``t`` evenly subsampled positions ``[..., t]`` -> ``[..., frames]``,
  linearly interpolated between the positions' centres and renormalised, so
  each value is a share of attention per input frame (rows sum to one)."""
  weights = np.asarray(weights, np.float64)
  t = weights.shape[-1]
  centres = (np.arange(t) + 0.5) * frames / t - 0.5
  spread = np.apply_along_axis(lambda w: np.interp(np.arange(frames), centres, w), -1, weights)
  return spread / np.maximum(spread.sum(axis=-1, keepdims=True), 1e-12)


def speech_curves(intermediates, frames: int) -> Dict[str, np.ndarray]:
  """``{curve name: [batch, frames]}``: what each model attends to over time.

  A CLS token (KWT: one token per frame plus CLS) gives its last-layer row
  and its rollout row; attention pooling (Conformer) gives its weights and,
  pushed back through the blocks' rollout, where the pooled evidence came
  from (an approximation: rollout sees the attention, not the Conformer's
  convolutions, which also mix neighbouring frames); either over subsampled
  frames is spread back onto the spectrogram's.
  """
  attention = split_attention(intermediates)
  self_attention = attention.heads
  curves = {}
  if attention.pooling:
    pooled = pooled_weights(attention.pooling[-1])               # [batch, t]
    curves["attention pooling"] = pooled
    if self_attention and self_attention[-1].shape[-1] == pooled.shape[-1]:
      rollout = attention_rollout(self_attention)                # [batch, t, t]
      curves["pooling through rollout"] = np.einsum("bt,bts->bs", pooled, rollout)
  elif self_attention:
    # One token per frame plus one is KWT's CLS; anything else is subsampled
    # positions without a CLS token.
    first = 1 if self_attention[-1].shape[-1] == frames + 1 else 0
    rollout = attention_rollout(self_attention)
    if first:
      curves["CLS, last layer"] = self_attention[-1].mean(axis=1)[:, 0, 1:]
      curves["CLS rollout"] = rollout[:, 0, 1:]
    else:
      curves["mean rollout"] = rollout.mean(axis=1)
  return {name: spread_over_frames(w, frames) for name, w in curves.items()}


def draw_speech_examples(out_dir, inputs, labels, predictions, intermediates,
                         vocabulary=None, class_names=None) -> Pictures:
  """Per clip: the spectrogram with ``speech_curves`` beneath it, and a head grid."""
  pictures: Pictures = {}
  spectrograms = collect_sown(intermediates, "spectrogram")
  if not spectrograms:
    raise ValueError("draw_speech_examples: the model sowed no 'spectrogram'; "
                     "speech pictures need the log-mel front end")
  module, spectrogram = spectrograms[0]                          # [batch, frames, mels]
  if spectrogram.ndim != 3:
    raise ValueError(f"spectrogram sown by {module} has shape {spectrogram.shape}; "
                     "expected [batch, frames, mels]")
  curves = speech_curves(intermediates, spectrogram.shape[1])
  heads = split_attention(intermediates).heads
  name = (lambda c: class_names[c]) if class_names is not None else str
  for i in range(len(labels)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    title = f"label {name(labels[i])}, predicted {name(predictions[i])}"
    pictures.update(sequences.draw_spectrogram_attention(
        spectrogram[i], {k: v[i] for k, v in curves.items()},
        os.path.join(out_dir, f"{tag}_spectrogram.png"), title))
    if heads:
      pictures.update(draw_head_grid(heads, i, os.path.join(out_dir, f"{tag}_heads.png"),
                                     title))
  return pictures


__all__ = ["draw_speech_examples", "speech_curves", "spread_over_frames"]
