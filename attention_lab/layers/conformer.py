"""Conformer blocks (Gulati et al. 2020): self-attention for global context,
convolution for local patterns, between two half-step feed-forward layers.

Positions enter as a learned relative-position bias per head and clipped
distance, added to the attention scores as a ``score_mod``
(``kernels.mods.relative_bias``, built by the attention layer from
``AttentionConfig(score_mod="relative_bias")``): the kernels read the
``[heads, 2 * max_distance + 1]`` table per block, no ``[T, T]`` bias is ever
materialised, and the fused Pallas kernel keeps it on GPU and TPU. The
paper's Transformer-XL relative encoding plays the same role.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from attention_lab.layers.attention import AttentionConfig
from attention_lab.layers.attention import SelfAttention
from attention_lab.layers.transformer import MlpBlock


def with_relative_bias(attention: AttentionConfig, max_distance: int) -> AttentionConfig:
  """``attention`` with the Conformer's position bias: a learned
  ``relative_bias`` score_mod (per block, ``[heads, 2 * max_distance + 1]``
  parameter ``relative_bias`` of its attention), unless the config already
  names a score_mod (which then replaces it, e.g. ``alibi``)."""
  if attention.score_mod is not None:
    return attention
  return dataclasses.replace(attention, score_mod="relative_bias",
                             score_mod_args={"max_distance": int(max_distance)})


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
    attention: the self-attention's settings (``AttentionConfig``); its
      ``score_mod`` carries the relative positions (``with_relative_bias``).
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
