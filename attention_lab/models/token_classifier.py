"""The shared tail of the Transformer classifiers: tokens -> encoder -> logits.

ViT, the pixel Transformer and the text classifier differ only in how they
turn their input into tokens; everything after that lives here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers import AttentionConfig
from attention_lab.layers import Encoder
from attention_lab.layers import LearnedPositionEmbedding
from attention_lab.layers import masked_mean
from attention_lab.layers import rotary


class TokenClassifier(nn.Module):
  """Base of the Transformer classifiers; subclasses embed and call ``_classify``.

  Attributes:
    num_classes: output logits.
    hidden_dim: token width.
    num_layers, num_heads, mlp_dim: encoder shape.
    dropout_rate: dropout on the embeddings, residuals and MLPs.
    attention: every attention setting (``AttentionConfig``: kernel,
      attention dropout, window, mods, rotary, qk-norm, K/V heads), from
      ``config.model.attention``.
    pool: ``cls`` (a learned class token) or ``mean`` (average of the valid
      tokens).
    dtype: compute dtype of the embedding and the encoder (None: float32);
      parameters and logits are float32.
  """
  num_classes: int
  hidden_dim: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  pool: str = "cls"
  dtype: Any = None

  def _classify(self, x, train: bool, valid=None, grid=None):
    """tokens ``[batch, tokens, hidden_dim]`` -> logits ``[batch, num_classes]``.

    Args:
      valid: optional bool ``[batch, tokens]``, False at padding, which must
        trail the tokens (True on a prefix, as the text pipelines pad). The
        padding is hidden from every attention row and from mean pooling.
      grid: ``(height, width)`` when the tokens are image patches in row-major
        order: the positions of 2-D rotary embeddings.
    """
    name = type(self).__name__
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_dim))
      cls = jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_dim)).astype(x.dtype)
      x = jnp.concatenate([cls, x], axis=1)
      if valid is not None:
        valid = jnp.concatenate([jnp.ones((x.shape[0], 1), bool), valid], axis=1)
    elif self.pool != "mean":
      raise ValueError(f"{name}: unknown pool {self.pool!r}; use 'cls' or 'mean'")
    x = LearnedPositionEmbedding(name="position_embedding")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    # Padding travels as lengths, which the fused kernels take (a dense mask
    # would send TPU and GPU to a materialised kernel). Keys at padding are
    # hidden; queries at padding still compute (no q_lengths: their outputs
    # are never read, and the sown weights keep those rows as they were).
    lengths = None if valid is None else valid.sum(axis=-1, dtype=jnp.int32)
    x = Encoder(
        num_layers=self.num_layers, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, attention=self.attention,
        dtype=self.dtype, name="encoder")(x, kv_lengths=lengths,
                                          positions=self._positions(grid),
                                          deterministic=not train)
    if self.pool == "cls":
      x = x[:, 0]
    elif valid is None:
      x = x.mean(axis=1)
    else:
      x = masked_mean(x, valid)
    # Logits in float32 whatever ``dtype``: they feed the softmax, and the head
    # is one small matrix.
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    dtype=jnp.float32, name="head")(x)

  def _positions(self, grid):
    """Rotary positions: None for ``"1d"`` (the encoder counts tokens), the
    patch grid (after the CLS token) for ``"2d"``."""
    if self.attention.rotary != "2d":
      return None
    if grid is None:
      raise ValueError(f"{type(self).__name__}: attention.rotary='2d' needs image patches; "
                       "use '1d' for sequences")
    return rotary.grid_positions(*grid, leading=1 if self.pool == "cls" else 0)
