"""Transformer encoder pieces: pre-norm blocks, MLP, positional encodings."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from attention_lab.layers.attention import AttentionConfig
from attention_lab.layers.attention import SelfAttention


def sinusoidal_positions(length: int, features: int, max_scale: float = 1e4):
  """Fixed sin/cos encodings of Vaswani et al.; returns ``[length, features]``."""
  positions = np.arange(length)[:, None]
  div = np.exp(np.arange(0, features, 2) * (-np.log(max_scale) / features))
  table = np.zeros((length, features), np.float32)
  table[:, 0::2] = np.sin(positions * div)
  table[:, 1::2] = np.cos(positions * div)[:, : features // 2]
  return jnp.asarray(table)


class LearnedPositionEmbedding(nn.Module):
  """Adds a learned ``[length, features]`` table to ``[batch, length, features]``."""
  stddev: float = 0.02

  @nn.compact
  def __call__(self, x):
    table = self.param("embedding", nn.initializers.normal(self.stddev),
                       x.shape[-2:])
    return x + table.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense -> activation (GELU; the Conformer's swish) -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = None
  activation: Callable = nn.gelu

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    features = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    x = self.activation(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(features, dtype=self.dtype)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """Pre-norm Transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

  Pre-norm keeps gradients well scaled without a long warm-up, which matters
  for the short CPU runs this project trains.
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  is_causal: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, mask=None, q_lengths=None, kv_lengths=None, positions=None,
               deterministic: bool = True):
    """``x [batch, length, features]`` -> ``[batch, length, features]``.

    Args:
      mask: bool broadcastable to ``[batch, heads, length, length]``.
      q_lengths / kv_lengths: int ``[batch]``, the valid prefix (trailing
        padding) as ``MultiHeadAttention`` takes it: ``kv_lengths`` alone
        hides padded keys and leaves padded rows computed, as the mask
        ``valid[:, None, None, :]``, while the fused kernels still run.
      positions: rotary positions, when ``attention.rotary`` is set.
    """
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = SelfAttention(
        num_heads=self.num_heads, attention=self.attention, is_causal=self.is_causal,
        dtype=self.dtype, name="attention")(
            y, mask=mask, q_lengths=q_lengths, kv_lengths=kv_lengths, positions=positions,
            deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype,
                        name="mlp")(y, deterministic=deterministic)


class Encoder(nn.Module):
  """A stack of ``EncoderBlock`` with a final LayerNorm."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  is_causal: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, mask=None, q_lengths=None, kv_lengths=None, positions=None,
               deterministic: bool = True):
    """``x [batch, length, features]`` -> same; ``mask``, ``q_lengths``,
    ``kv_lengths`` and ``positions`` reach every block's attention (see
    ``EncoderBlock``)."""
    for i in range(self.num_layers):
      x = EncoderBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
          attention=self.attention, is_causal=self.is_causal, dtype=self.dtype,
          name=f"block_{i}")(x, mask=mask, q_lengths=q_lengths, kv_lengths=kv_lengths,
                             positions=positions, deterministic=deterministic)
    return nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
