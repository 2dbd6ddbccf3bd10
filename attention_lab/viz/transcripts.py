"""Speech recognition pictures: the alignment of the written characters over
the spectrogram (what the decoder listened to while writing each character).

Shape contract: the front end sows ``spectrogram`` ``[batch, frames, mels]``;
each decoder block sows its cross-attention ``.../cross_attention/
attention_weights`` ``[batch, heads, output_length, positions]`` over the
encoder's subsampled positions (``models.speech_recognition``, which sows the
pass over its own transcript last); ``labels`` and ``predictions`` are
character ids ``[batch, output_length]``.

Per example one picture, ``example{i}_transcript.png``: the spectrogram on
top, beneath it the last decoder layer's cross-attention (heads averaged),
spread back from the subsampled positions onto the frames, one row per
written character, on the same time axis.
"""

from __future__ import annotations

import os

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save
from attention_lab.viz.sown import collect_sown
from attention_lab.viz.speech import spread_over_frames
from attention_lab.viz.translation import cross_attention_layers


def draw_transcript(spectrogram: np.ndarray, alignment: np.ndarray, output_tokens,
                    path: str, title: str) -> Pictures:
  """``spectrogram [frames, mels]`` above ``alignment [len(output_tokens), frames]``.

  Raises:
    ValueError: shapes that do not match, named.
  """
  spectrogram, alignment = np.asarray(spectrogram), np.asarray(alignment)
  if spectrogram.ndim != 2 or alignment.shape != (len(output_tokens), spectrogram.shape[0]):
    raise ValueError(f"draw_transcript: spectrogram {spectrogram.shape} [frames, mels] and "
                     f"alignment {alignment.shape}, expected [{len(output_tokens)}, frames]")
  frames = spectrogram.shape[0]
  rows = len(output_tokens)
  fig, (top, bottom) = plt.subplots(
      2, 1, figsize=(max(5.0, frames * 0.04), 2.0 + 0.16 * rows + 0.8), dpi=100, sharex=True,
      gridspec_kw={"height_ratios": [2.0, max(1.0, 0.16 * rows)]})
  top.imshow(spectrogram.T, origin="lower", aspect="auto", cmap="magma")
  top.set_ylabel("mel band", fontsize=7)
  bottom.imshow(alignment, aspect="auto", cmap="gray_r", vmin=0.0,
                vmax=max(float(alignment.max()), 1e-9), interpolation="nearest")
  bottom.set_yticks(np.arange(rows))
  bottom.set_yticklabels([sequences.printable(t) for t in output_tokens], fontsize=6)
  bottom.set_xlabel("frame (10 ms)", fontsize=7)
  top.set_title(title, fontsize=8)
  fig.tight_layout()
  return save(fig, path)


def draw_transcript_examples(out_dir, inputs, labels, predictions, intermediates,
                             vocabulary=None, class_names=None) -> Pictures:
  """One spectrogram-and-alignment picture per example."""
  del inputs, class_names  # the sown spectrogram is the picture of the audio
  if vocabulary is None:
    raise ValueError("draw_transcript_examples needs the dataset's vocabulary")
  spectrograms = collect_sown(intermediates, "spectrogram")
  if not spectrograms:
    return {}
  spectrogram = np.asarray(spectrograms[-1][1])
  if spectrogram.ndim != 3:
    raise ValueError(f"draw_transcript_examples: spectrogram has shape {spectrogram.shape}; "
                     "expected [batch, frames, mels]")
  # The encoder's positions: the key length of any cross-attention layer.
  cross = [w for m, w in collect_sown(intermediates, "attention_weights")
           if "cross_attention" in m.split("/")]
  if not cross:
    return {}
  last = cross_attention_layers(intermediates, cross[-1].shape[-1])[-1][1]
  pictures: Pictures = {}
  for i in range(len(predictions)):
    output_tokens = sequences.tokens_of(predictions[i], vocabulary)
    if not output_tokens:
      continue                              # nothing written: nothing to draw
    text = "".join(t for t in output_tokens if t != "<eos>")
    truth = "".join(t for t in sequences.tokens_of(labels[i], vocabulary) if t != "<eos>")
    verdict = "right" if text == truth else f"wrong; said: {truth}"
    weights = np.asarray(last[i], np.float64).mean(axis=0)[:len(output_tokens)]
    alignment = spread_over_frames(weights, spectrogram.shape[1])
    pictures.update(draw_transcript(
        spectrogram[i], alignment, output_tokens,
        os.path.join(out_dir, f"example{i}_transcript.png"),
        f"heard: {text} ({verdict}); last decoder layer's cross-attention, heads averaged"))
  return pictures


__all__ = ["draw_transcript", "draw_transcript_examples"]
