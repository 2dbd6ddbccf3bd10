"""Text classifier pictures: the tokens coloured by attention (HTML), and for
Transformers the head grid of every layer over the valid tokens.

Shape contract: ``inputs`` are token ids ``[batch, length]`` with 0 as
padding; a Transformer's attention covers the ``length`` positions, after one
CLS token or alone (``sown.leading_tokens`` checks which).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from attention_lab.viz import sequences
from attention_lab.viz.canvas import Pictures
from attention_lab.viz.panels import draw_head_grid
from attention_lab.viz.rollout import attention_rollout
from attention_lab.viz.sown import SownAttention
from attention_lab.viz.sown import leading_tokens
from attention_lab.viz.sown import pooled_weights
from attention_lab.viz.sown import split_attention


def token_weights(attention: SownAttention,
                  ids: np.ndarray) -> Tuple[str, Optional[np.ndarray]]:
  """``(what, [batch, length])``: attention pooling's weights when the model
  pools with attention, else the rollout row of the CLS token (or the mean
  row over valid tokens without one) of a Transformer; ``("", None)`` when
  the model sowed no attention."""
  if attention.pooling:
    return "attention pooling", pooled_weights(attention.pooling[-1])
  if not attention.heads:
    return "", None
  rollout = attention_rollout(attention.heads)                 # [batch, t, t]
  if leading_tokens(rollout.shape[-1], ids.shape[1], "text attention"):
    return "CLS attention rollout", rollout[:, 0, 1:]
  valid = (ids != 0).astype(np.float64)
  row = (rollout * valid[:, :, None]).sum(1) / np.maximum(valid.sum(1, keepdims=True), 1)
  return "mean attention rollout", row


def draw_text_examples(out_dir, inputs, labels, predictions, intermediates,
                       vocabulary=None, class_names=None) -> Pictures:
  """Pictures of token ids ``inputs`` ``[batch, length]`` read with ``vocabulary``."""
  if vocabulary is None:
    raise ValueError("draw_text_examples needs the dataset's vocabulary")
  ids = np.asarray(inputs)
  if ids.ndim != 2:
    raise ValueError(f"draw_text_examples: inputs have shape {ids.shape}; "
                     "expected token ids [batch, length]")
  pictures: Pictures = {}
  attention = split_attention(intermediates)
  what, weights = token_weights(attention, ids)
  layers = attention.heads
  offset = leading_tokens(layers[0].shape[-1], ids.shape[1], "text attention") if layers else 0
  for i in range(len(ids)):
    tag = f"example{i}_label{labels[i]}_pred{predictions[i]}"
    valid = np.flatnonzero(ids[i] != 0)
    tokens = [vocabulary[t] for t in ids[i, valid]]
    if weights is not None:
      pictures.update(sequences.token_html(
          tokens, weights[i, valid], os.path.join(out_dir, f"{tag}_tokens.html"),
          f"{what}: label {labels[i]}, predicted {predictions[i]}"))
    if layers:
      keep = np.concatenate([np.arange(offset), valid + offset])
      grid = [w[:, :, keep][:, :, :, keep] for w in layers]
      names = ["CLS"] * offset + tokens
      pictures.update(draw_head_grid(grid, i, os.path.join(out_dir, f"{tag}_heads.png"),
                                     tokens=names))
  return pictures


__all__ = ["draw_text_examples", "token_weights"]
