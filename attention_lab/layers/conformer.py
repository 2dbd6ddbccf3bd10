"""Conformer blocks (Gulati et al. 2020): self-attention for global context,
convolution for local patterns, between two half-step feed-forward layers.

Positions enter as a learned relative-position bias per head (distance
clipped to ``max_distance``), added to the attention scores through the
kernels' ``bias`` argument; the paper's Transformer-XL relative encoding
plays the same role.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from attention_lab.layers.attention import AttentionConfig
from attention_lab.layers.attention import SelfAttention
from attention_lab.layers.transformer import MlpBlock


class RelativePositionBias(nn.Module):
  """A learned scalar per head and clipped distance ``key - query``.

  Attributes:
    num_heads: heads of the attention it feeds.
    max_distance: distances beyond this share the edge value.
  """
  num_heads: int
  max_distance: int = 32

  @nn.compact
  def __call__(self, length: int):
    """-> float32 bias ``[1, heads, length, length]``."""
    table = self.param("table", nn.initializers.zeros,
                       (2 * self.max_distance + 1, self.num_heads))
    distance = np.arange(length)[None, :] - np.arange(length)[:, None]
    index = np.clip(distance, -self.max_distance, self.max_distance) + self.max_distance
    return jnp.transpose(table[index], (2, 0, 1))[None]


class ConvModule(nn.Module):
  """LayerNorm -> pointwise conv + GLU -> depthwise conv -> BatchNorm -> swish
  -> pointwise conv -> dropout, over ``[batch, time, features]``.

  Attributes:
    kernel_size: depthwise convolution width in frames (odd: centred).
  """
  kernel_size: int = 15
  dropout_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    features = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(2 * features, dtype=self.dtype, name="pointwise_in")(y)
    y = nn.glu(y, axis=-1)
    y = nn.Conv(features, (self.kernel_size,), padding="SAME",
                feature_group_count=features, dtype=self.dtype, name="depthwise")(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(y)
    y = nn.swish(y)
    y = nn.Dense(features, dtype=self.dtype, name="pointwise_out")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class ConformerBlock(nn.Module):
  """``x + FF/2``, ``+ MHSA``, ``+ Conv``, ``+ FF/2``, then LayerNorm.

  Attributes:
    num_heads, mlp_dim: attention heads and feed-forward width.
    conv_kernel_size: depthwise convolution width.
    attention: the self-attention's settings (``AttentionConfig``).
  """
  num_heads: int
  mlp_dim: int
  conv_kernel_size: int = 15
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, bias=None, train: bool = False):
    """``x [batch, time, features]``, ``bias`` broadcastable to
    ``[batch, heads, time, time]`` -> ``[batch, time, features]``."""
    deterministic = not train

    def half_step(x, name):       # the Macaron feed-forward: LayerNorm, swish MLP, weight 1/2
      y = nn.LayerNorm(dtype=self.dtype, name=f"{name}_norm")(x)
      return 0.5 * MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, nn.swish,
                            name=name)(y, deterministic=deterministic)

    x = x + half_step(x, "ff_in")
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = SelfAttention(num_heads=self.num_heads, attention=self.attention, dtype=self.dtype,
                      name="attention")(y, bias=bias, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + ConvModule(self.conv_kernel_size, self.dropout_rate, self.dtype,
                       name="conv")(x, train=train)
    x = x + half_step(x, "ff_out")
    return nn.LayerNorm(dtype=self.dtype)(x)
