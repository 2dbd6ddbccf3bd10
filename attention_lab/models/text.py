"""Text classifiers over token ids (ListOps symbols, IMDB bytes): a Transformer
encoder, and a bidirectional RNN with additive attention pooling.

Inputs are int32 ``[batch, length]`` with id 0 as padding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers import AttentionPooling
from attention_lab.models.token_classifier import TokenClassifier

PAD_ID = 0


def _check_tokens(name: str, tokens):
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} expects int token ids [batch, length], got "
                     f"{tokens.dtype} {tuple(tokens.shape)}")


class TextTransformer(TokenClassifier):
  """Transformer encoder classifier (the Long Range Arena text and ListOps model).

  Attributes (besides ``TokenClassifier``'s):
    vocab_size: token ids are in ``[0, vocab_size)``; 0 is padding.
  """
  vocab_size: int = 257

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    """tokens int ``[batch, length]`` -> logits ``[batch, num_classes]``."""
    _check_tokens("TextTransformer", tokens)
    x = nn.Embed(self.vocab_size, self.hidden_dim, dtype=self.dtype,
                 name="token_embedding")(tokens)
    return self._classify(x, train, valid=tokens != PAD_ID)


class RnnAttentionClassifier(nn.Module):
  """Bidirectional GRU/LSTM encoder, additive attention pooling, linear head.

  The basic attention mechanism as a classifier (Bahdanau-style pooling, as in
  Yang et al. 2016 without the hierarchy): a learned query scores every
  encoder state, the softmax over valid positions weights their sum.

  Attributes:
    num_classes: output logits.
    vocab_size: token ids in ``[0, vocab_size)``; 0 is padding.
    embed_dim: token embedding width.
    hidden_dim: RNN state width per direction.
    attention_units: hidden width of the additive score.
    cell: ``gru`` or ``lstm``.
    dropout_rate: on embeddings and on the pooled vector.
    dtype: compute dtype (None: float32); the RNN carries its state in float32.
  """
  num_classes: int
  vocab_size: int = 257
  embed_dim: int = 64
  hidden_dim: int = 128
  attention_units: int = 128
  cell: str = "gru"
  dropout_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    """tokens int ``[batch, length]`` -> logits ``[batch, num_classes]``.

    The pooling weights ``[batch, length]`` are sown (``attention_weights``)
    for pictures.
    """
    _check_tokens("RnnAttentionClassifier", tokens)
    valid = tokens != PAD_ID
    lengths = valid.sum(axis=-1)
    x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                 name="token_embedding")(tokens)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    states = bidirectional_rnn(self.cell, self.hidden_dim, self.dtype)(x, seq_lengths=lengths)
    pooled, _ = AttentionPooling(self.attention_units, dtype=self.dtype,
                                 name="pooling")(states, mask=valid)
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)   # float32 logits


def rnn_cell(kind: str, features: int, dtype=None, name=None) -> nn.RNNCellBase:
  """A GRU or LSTM cell by name. Its gates' matrix products run in ``dtype``;
  its state stays float32 (Flax starts the carry in ``param_dtype``), so
  rounding does not build up over the steps."""
  cells = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell}
  if kind not in cells:
    raise ValueError(f"unknown RNN cell {kind!r}; use one of {sorted(cells)}")
  return cells[kind](features, dtype=dtype, param_dtype=jnp.float32, name=name)


def bidirectional_rnn(kind: str, features: int, dtype=None, name="encoder") -> nn.Module:
  """``[batch, length, in] -> [batch, length, 2 * features]``, forward and
  backward states concatenated; ``seq_lengths`` keeps the backward pass from
  starting in the padding."""
  return nn.Bidirectional(nn.RNN(rnn_cell(kind, features, dtype)),
                          nn.RNN(rnn_cell(kind, features, dtype)), name=name)
