"""Pictures of attention over sequences: tokens, alignments, spectrograms.

- ``token_html``: text coloured by attention (pooling weights or the CLS row),
  as HTML, where characters and bytes read better than in a PNG.
- ``draw_alignment``: a seq2seq decoder's attention, output x input, with the
  characters on the axes (the figure of Bahdanau et al. 2015).
- ``draw_spectrogram_attention``: a log-mel spectrogram with the attention
  over its time frames drawn beneath it, on the same time axis.
- ``tokens_of``: token ids back to the strings they stand for.

The drawers of whole examples that use these live in ``text``, ``alignment``
and ``speech``.
"""

from __future__ import annotations

import html
import os
from typing import Dict, List, Sequence

import numpy as np

from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save

# Beyond this many tokens, tick labels overlap and are left out.
MAX_LABELLED_TOKENS = 60


def _check_weights(name: str, weights: np.ndarray, ndim: int) -> np.ndarray:
  weights = np.asarray(weights, np.float64)
  if weights.ndim != ndim:
    raise ValueError(f"{name}: expected {ndim}-d weights, got shape {weights.shape}")
  if not np.all(np.isfinite(weights)):
    raise ValueError(f"{name}: weights contain NaN or infinity")
  return weights


def printable(token: str) -> str:
  """A visible form of a token: spaces as '·', control bytes as ``\\xNN``."""
  if token == " ":
    return "\u00b7"
  return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in token)


def tokens_of(ids, vocabulary) -> List[str]:
  """Token strings of ``ids`` ``[length]``: padding and ``<bos>`` dropped,
  reading up to and including ``<eos>`` (a decoder's last word)."""
  out = []
  for i in np.asarray(ids).tolist():
    token = vocabulary[i]
    if token in ("<pad>", "<bos>"):
      continue
    out.append(token)
    if token == "<eos>":
      break
  return out


def token_html(tokens: Sequence[str], weights: np.ndarray, path: str, title: str) -> Dict[str, None]:
  """Writes ``tokens`` with backgrounds shaded by ``weights`` ``[len(tokens)]``
  (darkest = the largest weight) as an HTML fragment; each token's weight is
  in its tooltip.

  Returns:
    ``{path: None}`` (HTML has no pixels to send to TensorBoard).
  """
  weights = _check_weights("token_html", weights, 1)
  if len(tokens) != len(weights):
    raise ValueError(f"token_html: {len(tokens)} tokens but {len(weights)} weights")
  top = weights.max() if len(weights) and weights.max() > 0 else 1.0
  spans = []
  for token, w in zip(tokens, weights):
    alpha = w / top
    spans.append(
        f'<span title="{w:.4f}" style="background: rgba(220, 50, 30, {alpha:.3f}); '
        f'padding: 1px 0">{html.escape(printable(token))}</span>')
  fragment = (f'<div class="tokens"><p><b>{html.escape(title)}</b></p>'
              f'<p style="font-family: monospace; line-height: 1.8; word-wrap: break-word">'
              f'{"".join(spans)}</p></div>\n')
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(fragment)
  return {path: None}


def draw_alignment(weights: np.ndarray, input_tokens: Sequence[str],
                   output_tokens: Sequence[str], path: str, title: str) -> Pictures:
  """The alignment matrix ``[output_length, input_length]``: row ``t`` is where
  the decoder looked while writing output token ``t``."""
  weights = _check_weights("draw_alignment", weights, 2)
  if weights.shape != (len(output_tokens), len(input_tokens)):
    raise ValueError(
        f"draw_alignment: weights {weights.shape} do not match {len(output_tokens)} output "
        f"x {len(input_tokens)} input tokens")
  rows, cols = weights.shape
  fig, ax = plt.subplots(figsize=(max(3.0, 0.22 * cols + 1.5), max(2.5, 0.22 * rows + 1.2)),
                         dpi=100)
  ax.imshow(weights, cmap="gray_r", vmin=0.0, vmax=max(weights.max(), 1e-9), aspect="auto")
  ax.set_xticks(np.arange(cols))
  ax.set_xticklabels([printable(t) for t in input_tokens], fontsize=8)
  ax.set_yticks(np.arange(rows))
  ax.set_yticklabels([printable(t) for t in output_tokens], fontsize=8)
  ax.set_xlabel("input")
  ax.set_ylabel("output")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return save(fig, path)


def draw_spectrogram_attention(spectrogram: np.ndarray, weights: Dict[str, np.ndarray],
                               path: str, title: str, hop_seconds: float = 0.01) -> Pictures:
  """The log-mel spectrogram ``[frames, mels]`` and, beneath it on the same time
  axis, one curve per entry of ``weights`` (name -> ``[frames]``)."""
  spectrogram = _check_weights("draw_spectrogram_attention", spectrogram, 2)
  frames = spectrogram.shape[0]
  for name, w in weights.items():
    if np.shape(w) != (frames,):
      raise ValueError(f"draw_spectrogram_attention: {name!r} has shape {np.shape(w)}, "
                       f"expected ({frames},) to match the spectrogram's frames")
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.2), dpi=100, sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
  seconds = frames * hop_seconds
  top.imshow(spectrogram.T, origin="lower", aspect="auto", cmap="magma",
             extent=(0, seconds, 0, spectrogram.shape[1]))
  top.set_ylabel("mel band")
  top.set_title(title, fontsize=9)
  times = (np.arange(frames) + 0.5) * hop_seconds
  for name, w in weights.items():
    bottom.plot(times, np.asarray(w, np.float64), label=name)
  bottom.set_xlabel("time (s)")
  bottom.set_ylabel("attention")
  bottom.set_ylim(bottom=0)
  bottom.grid(alpha=0.3)
  if weights:
    bottom.legend(fontsize=7)
  fig.tight_layout()
  return save(fig, path)


__all__ = ["MAX_LABELLED_TOKENS", "draw_alignment", "draw_spectrogram_attention",
           "printable", "token_html", "tokens_of"]
