"""Seq2seq pictures: the decoder's alignment (output x input tokens) per
example, with the output the model wrote (up to its ``<eos>``) on the rows.

Shape contract: ``inputs`` is ``{"source": [batch, source_length]}`` token ids
(0 is padding); the model sows ``alignment`` ``[batch, output_length,
source_length]``; ``labels`` and ``predictions`` are token ids
``[batch, output_length]``.
"""

from __future__ import annotations

import os

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.sequences import tokens_of
from attention_lab.viz.sown import collect_sown


def draw_alignment_examples(out_dir, inputs, labels, predictions, intermediates,
                            vocabulary=None, class_names=None) -> Pictures:
  """One alignment picture per example of ``inputs["source"]``."""
  if vocabulary is None:
    raise ValueError("draw_alignment_examples needs the dataset's vocabulary")
  if not isinstance(inputs, dict) or "source" not in inputs:
    raise ValueError(f"draw_alignment_examples: inputs are {type(inputs).__name__}; "
                     "expected a dict with 'source' token ids [batch, length]")
  pictures: Pictures = {}
  alignments = collect_sown(intermediates, "alignment")
  if not alignments:
    return pictures
  module, alignment = alignments[-1]                           # [batch, out, in]
  source = np.asarray(inputs["source"])
  if alignment.ndim != 3 or alignment.shape[-1] != source.shape[-1]:
    raise ValueError(f"alignment sown by {module} has shape {alignment.shape}; expected "
                     f"[batch, output_length, {source.shape[-1]}] for sources {source.shape}")
  for i in range(len(source)):
    valid = np.flatnonzero(source[i] != 0)
    input_tokens = [vocabulary[t] for t in source[i, valid]]
    output_tokens = tokens_of(predictions[i], vocabulary)
    verdict = "right" if tokens_of(labels[i], vocabulary) == output_tokens else "wrong"
    weights = alignment[i, :len(output_tokens)][:, valid]
    pictures.update(sequences.draw_alignment(
        weights, input_tokens, output_tokens,
        os.path.join(out_dir, f"example{i}_alignment.png"),
        f"{''.join(input_tokens)} -> {''.join(t for t in output_tokens if t != '<eos>')} "
        f"({verdict})"))
  return pictures


__all__ = ["draw_alignment_examples"]
