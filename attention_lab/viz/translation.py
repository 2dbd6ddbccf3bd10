"""Transformer translation pictures: the decoder's cross-attention, output
characters x source characters, for every layer and head.

Shape contract: ``inputs`` is ``{"source": [batch, source_length]}`` token ids
(0 is padding); each decoder block sows its cross-attention as
``.../cross_attention/attention_weights`` ``[batch, heads, output_length,
source_length]`` (``models.transformer_seq2seq``, which sows the pass over its
own translation last); ``labels`` and ``predictions`` are token ids
``[batch, output_length]``.

Per example two pictures: ``example{i}_cross_attention.png``, a grid with
one row per layer and one column per head, and ``example{i}_alignment.png``,
the last layer's heads averaged, drawn as the RNN's alignment is
(``sequences.draw_alignment``) so the two models compare side by side.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.canvas import plt
from attention_lab.viz.canvas import save
from attention_lab.viz.sown import collect_sown


def cross_attention_layers(intermediates, source_length: int) -> List[Tuple[str, np.ndarray]]:
  """``(module, [batch, heads, output_length, source_length])`` per decoder
  layer, in layer order: the value each cross-attention layer sowed last.

  Raises:
    ValueError: a cross-attention array that is not rank 4 over
      ``source_length`` keys, naming its module and shape.
  """
  last = {}
  for module, weights in collect_sown(intermediates, "attention_weights"):
    if "cross_attention" not in module.split("/"):
      continue
    if weights.ndim != 4 or weights.shape[-1] != source_length:
      raise ValueError(f"cross-attention sown by {module} has shape {weights.shape}; "
                       f"expected [batch, heads, output_length, {source_length}]")
    last[module] = weights                 # later passes replace earlier ones
  return list(last.items())


def draw_cross_attention_grid(layers: Sequence[np.ndarray], input_tokens: Sequence[str],
                              output_tokens: Sequence[str], path: str,
                              title: str) -> Pictures:
  """One heat map per layer (rows) and head (columns), each ``[len(output_tokens),
  len(input_tokens)]``: row ``t`` is where that head looked while writing
  output token ``t``.

  Args:
    layers: per layer, ``[heads, len(output_tokens), len(input_tokens)]``.
  """
  if not layers:
    raise ValueError("draw_cross_attention_grid: no layers to draw")
  expected = (len(output_tokens), len(input_tokens))
  for l, weights in enumerate(layers):
    if np.ndim(weights) != 3 or np.shape(weights)[1:] != expected:
      raise ValueError(f"draw_cross_attention_grid: layer {l} has shape "
                       f"{np.shape(weights)}, expected [heads, {expected[0]}, {expected[1]}]")
  heads = layers[0].shape[0]
  rows, cols = expected
  width = max(2.2, 0.13 * cols + 0.9)
  height = max(1.8, 0.13 * rows + 0.9)
  fig, axes = plt.subplots(len(layers), heads, figsize=(width * heads, height * len(layers)),
                           dpi=100, squeeze=False)
  x_names = [sequences.printable(t) for t in input_tokens]
  y_names = [sequences.printable(t) for t in output_tokens]
  for l, weights in enumerate(layers):
    for h in range(heads):
      ax = axes[l, h]
      ax.imshow(np.asarray(weights[h], np.float64), cmap="gray_r", vmin=0.0,
                vmax=max(float(np.max(weights[h])), 1e-9), aspect="auto")
      ax.set_xticks(np.arange(cols))
      ax.set_xticklabels(x_names, fontsize=5)
      ax.set_yticks(np.arange(rows))
      ax.set_yticklabels(y_names, fontsize=5)
      ax.set_title(f"layer {l}, head {h}", fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return save(fig, path)


def draw_translation_examples(out_dir, inputs, labels, predictions, intermediates,
                              vocabulary=None, class_names=None) -> Pictures:
  """The cross-attention grid and the last layer's mean alignment per example."""
  del class_names  # translations have no classes
  if vocabulary is None:
    raise ValueError("draw_translation_examples needs the dataset's vocabulary")
  if not isinstance(inputs, dict) or "source" not in inputs:
    raise ValueError(f"draw_translation_examples: inputs are {type(inputs).__name__}; "
                     "expected a dict with 'source' token ids [batch, length]")
  source = np.asarray(inputs["source"])
  layers = cross_attention_layers(intermediates, source.shape[-1])
  pictures: Pictures = {}
  if not layers:
    return pictures
  for i in range(len(source)):
    valid = np.flatnonzero(source[i] != 0)
    input_tokens = [vocabulary[t] for t in source[i, valid]]
    output_tokens = sequences.tokens_of(predictions[i], vocabulary)
    if not output_tokens:
      continue                              # nothing written: nothing to draw
    verdict = "right" if sequences.tokens_of(labels[i], vocabulary) == output_tokens else "wrong"
    text = "".join(t for t in output_tokens if t != "<eos>")
    title = f"{''.join(input_tokens)} -> {text} ({verdict})"
    per_layer = [w[i][:, :len(output_tokens)][:, :, valid] for _, w in layers]
    pictures.update(draw_cross_attention_grid(
        per_layer, input_tokens, output_tokens,
        os.path.join(out_dir, f"example{i}_cross_attention.png"),
        f"cross-attention per layer and head: {title}"))
    pictures.update(sequences.draw_alignment(
        per_layer[-1].mean(axis=0), input_tokens, output_tokens,
        os.path.join(out_dir, f"example{i}_alignment.png"),
        f"last layer, heads averaged: {title}"))
  return pictures


__all__ = ["cross_attention_layers", "draw_cross_attention_grid",
           "draw_translation_examples"]
