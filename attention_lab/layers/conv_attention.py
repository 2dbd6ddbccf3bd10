"""Convolutional attention: re-weighting CNN feature maps by channel and by position.

Squeeze-and-Excitation (Hu et al. 2018), ECA (Wang et al. 2020) and CBAM
(Woo et al. 2018). Feature maps are ``[batch, height, width, channels]``; a
channel gate is ``[batch, channels]`` and a spatial map ``[batch, height,
width]``, both in (0, 1). The pooling and gating math are pure functions; the
modules only hold the small weights that turn pooled descriptors into gates.

Every module sows its gates into ``intermediates`` (``channel_weights``,
``spatial_map``, float32) so pictures can show what each block emphasised.

Mixed precision: the pooled descriptors are averaged in float32 (a mean over
every position); the modules' ``dtype`` sets where their small MLPs and
convolutions compute, and the gated map keeps the input's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp


def _check_feature_map(name: str, x) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} expects a feature map [batch, height, width, channels], "
                     f"got shape {tuple(x.shape)}")


def channel_pool(x) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Average and max over positions: ``[b, h, w, c]`` -> two ``[b, c]`` (float32)."""
  x = x.astype(jnp.float32)
  return x.mean(axis=(1, 2)), x.max(axis=(1, 2))


def spatial_pool(x) -> jnp.ndarray:
  """Average and max over channels: ``[b, h, w, c]`` -> ``[b, h, w, 2]`` (float32)."""
  x = x.astype(jnp.float32)
  return jnp.stack([x.mean(axis=-1), x.max(axis=-1)], axis=-1)


def gate(x, channel_weights=None, spatial_map=None):
  """``x * channel_weights[:, None, None, :] * spatial_map[..., None]`` in x's dtype."""
  out = x
  if channel_weights is not None:
    out = out * channel_weights[:, None, None, :].astype(x.dtype)
  if spatial_map is not None:
    out = out * spatial_map[..., None].astype(x.dtype)
  return out


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
  """ECA's adaptive kernel size: ``|log2(C) / gamma + b / gamma|`` rounded to odd.

  The nearest odd number at or above the truncated value, as in the paper's
  code: 3 for 16 to 64 channels, 5 for 128 to 512.
  """
  if channels < 1:
    raise ValueError(f"eca_kernel_size: channels must be positive, got {channels}")
  t = int(abs((math.log2(channels) + b) / gamma))
  return max(t if t % 2 else t + 1, 1)


def hidden_units(channels: int, reduction: int) -> int:
  """Bottleneck width ``C / r`` of SE and CBAM's channel MLP (at least 1)."""
  if reduction < 1:
    raise ValueError(f"reduction ratio must be >= 1, got {reduction}")
  return max(channels // reduction, 1)


class _ChannelMLP(nn.Module):
  """``Dense(C/r) -> ReLU -> Dense(C)``: the excitation MLP of SE and CBAM."""
  channels: int
  reduction: int
  dtype: Any = None

  @nn.compact
  def __call__(self, descriptor):
    h = nn.Dense(hidden_units(self.channels, self.reduction), dtype=self.dtype,
                 name="reduce")(descriptor)
    return nn.Dense(self.channels, dtype=self.dtype, name="expand")(nn.relu(h))


class SqueezeExcite(nn.Module):
  """SE: global average pool -> bottleneck MLP -> sigmoid channel gate.

  Parameters: ``2 C^2 / r`` weights plus ``C / r + C`` biases.

  Attributes:
    reduction: the ratio ``r`` (16 in the paper).
    dtype: compute dtype of the MLP (None: float32, the pooled descriptor's).
  """
  reduction: int = 16
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    _check_feature_map("SqueezeExcite", x)
    avg, _ = channel_pool(x)
    weights = nn.sigmoid(_ChannelMLP(x.shape[-1], self.reduction, self.dtype,
                                     name="mlp")(avg))
    self.sow("intermediates", "channel_weights", weights.astype(jnp.float32))
    return gate(x, channel_weights=weights)


class ECA(nn.Module):
  """Efficient Channel Attention: a 1-D convolution across pooled channels.

  No bottleneck: neighbouring channels interact through a ``k``-tap kernel,
  ``k = eca_kernel_size(C)``, so the module has just ``k`` parameters.

  Attributes:
    kernel_size: override of the adaptive size (None: from the channel count).
    dtype: compute dtype of the convolution (None: float32).
  """
  kernel_size: Optional[int] = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    _check_feature_map("ECA", x)
    channels = x.shape[-1]
    k = self.kernel_size or eca_kernel_size(channels)
    avg, _ = channel_pool(x)
    # Channels become the "length" axis of a one-feature 1-D convolution.
    scores = nn.Conv(1, (k,), padding="SAME", use_bias=False, dtype=self.dtype,
                     name="conv")(avg[..., None])
    weights = nn.sigmoid(scores[..., 0])
    self.sow("intermediates", "channel_weights", weights.astype(jnp.float32))
    return gate(x, channel_weights=weights)


class CBAM(nn.Module):
  """Convolutional Block Attention Module: channel gate, then spatial map.

  Channel: one MLP shared by the average- and max-pooled descriptors, their
  outputs summed before the sigmoid. Spatial: a ``k x k`` convolution over the
  channel-wise average and max of the channel-gated map, then a sigmoid.
  Parameters: ``2 C^2 / r + C / r + C`` (channel MLP) ``+ 2 k^2`` (spatial
  convolution, no bias).

  Attributes:
    reduction: channel MLP ratio ``r``.
    spatial_kernel: ``k`` (7 in the paper).
    dtype: compute dtype of the MLP and the convolution (None: float32).
  """
  reduction: int = 16
  spatial_kernel: int = 7
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    _check_feature_map("CBAM", x)
    mlp = _ChannelMLP(x.shape[-1], self.reduction, self.dtype, name="mlp")
    avg, mx = channel_pool(x)
    channel_weights = nn.sigmoid(mlp(avg) + mlp(mx))
    self.sow("intermediates", "channel_weights", channel_weights.astype(jnp.float32))
    x = gate(x, channel_weights=channel_weights)
    k = self.spatial_kernel
    logits = nn.Conv(1, (k, k), padding="SAME", use_bias=False, dtype=self.dtype,
                     name="spatial_conv")(spatial_pool(x))
    spatial_map = nn.sigmoid(logits[..., 0])
    self.sow("intermediates", "spatial_map", spatial_map.astype(jnp.float32))
    return gate(x, spatial_map=spatial_map)


CONV_ATTENTIONS = ("none", "se", "eca", "cbam")


def make(kind: str, *, reduction: int = 16, spatial_kernel: int = 7, dtype: Any = None,
         name: Optional[str] = None) -> Optional[nn.Module]:
  """The convolutional attention named by a config string, or None for ``none``.

  Raises:
    ValueError: an unknown ``kind``, listing the known ones.
  """
  if kind == "none":
    return None
  if kind == "se":
    return SqueezeExcite(reduction=reduction, dtype=dtype, name=name)
  if kind == "eca":
    return ECA(dtype=dtype, name=name)
  if kind == "cbam":
    return CBAM(reduction=reduction, spatial_kernel=spatial_kernel, dtype=dtype, name=name)
  raise ValueError(f"unknown conv_attention {kind!r}; known: {', '.join(CONV_ATTENTIONS)}")


__all__ = ["CBAM", "CONV_ATTENTIONS", "ECA", "SqueezeExcite", "channel_pool",
           "eca_kernel_size", "gate", "hidden_units", "make", "spatial_pool"]
