"""Keyframe detection: a per-frame CNN with convolutional attention, then
attention across frames, then a keyframe logit per frame.

``video [batch, frames, height, width, channels]`` -> logits ``[batch, frames]``.

1. Each frame goes through the same small ResNet (``image.ResidualBlock``
   with ``conv_attention`` none / se / eca / cbam: where in a frame to look)
   and is pooled to one feature vector.
2. A temporal convolution over neighbouring frames (an event is a change
   between a frame and the one before it, which a per-frame feature alone
   cannot show).
3. ``temporal``: which frames to relate to each other.
   - ``transformer``: a Transformer encoder over the frames (sinusoidal
     frame positions); its multi-head weights ``[batch, heads, frames,
     frames]`` are sown by ``layers.MultiHeadAttention``.
   - ``se``: temporal squeeze-excitation, SE with frames as its channels:
     each frame squeezed to the mean of its features, an MLP over the frames
     gives each frame a gate in (0, 1) (sown as ``channel_weights`` ``[batch,
     frames]`` under ``temporal_se``).
   - ``none``: the temporal convolution alone.
4. A linear head per frame.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers import AttentionConfig
from attention_lab.layers import Encoder
from attention_lab.layers import conv_attention
from attention_lab.layers.transformer import sinusoidal_positions
from attention_lab.models.image import ResidualBlock

TEMPORAL = ("transformer", "se", "none")


class FrameEncoder(nn.Module):
  """A small ResNet applied to frames: ``[n, height, width, channels]`` ->
  features ``[n, widths[-1]]`` (global average pooling).

  Stem ``conv3x3 -> BN -> ReLU``, then one stage per ``widths`` entry, each
  halving the resolution (32x32 frames end at 8x8 with two stages: the frame
  CNN runs on every frame of every clip, so its cost is multiplied by the
  clip length); ``conv_attention`` in every block.
  """
  widths: Sequence[int] = (16, 32)
  conv_attention: str = "none"
  reduction: int = 4
  spatial_kernel: int = 7
  dtype: Any = None

  @nn.compact
  def __call__(self, frames, *, train: bool):
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                name="stem_conv")(frames)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             name="stem_norm")(x))
    for stage, width in enumerate(self.widths):
      x = ResidualBlock(width, strides=2,
                        conv_attention=self.conv_attention, reduction=self.reduction,
                        spatial_kernel=self.spatial_kernel, dtype=self.dtype,
                        name=f"stage{stage}")(x, train=train)
    return x.mean(axis=(1, 2))


class TemporalSqueezeExcite(nn.Module):
  """Squeeze-excitation over frames: ``[batch, frames, features]`` -> same,
  each frame scaled by a gate computed from all frames' mean features.

  It is ``conv_attention.SqueezeExcite`` with frames as channels: the clip is
  laid out as a ``[batch, features, 1, frames]`` map, so the squeeze averages
  each frame's features and the excitation MLP mixes frames.
  """
  reduction: int = 4
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    as_map = jnp.transpose(x, (0, 2, 1))[:, :, None, :]      # [batch, features, 1, frames]
    gated = conv_attention.SqueezeExcite(reduction=self.reduction, dtype=self.dtype,
                                         name="se")(as_map)
    return jnp.transpose(gated[:, :, 0, :], (0, 2, 1))


class KeyframeDetector(nn.Module):
  """Per-frame keyframe logits for a clip.

  Attributes:
    widths: the frame CNN's channels per stage.
    conv_attention: ``none``, ``se``, ``eca`` or ``cbam`` in every frame block.
    reduction: SE/CBAM bottleneck ratio (frame blocks and temporal SE).
    spatial_kernel: CBAM's spatial convolution size.
    temporal: ``transformer``, ``se`` or ``none`` (see the module docstring).
    temporal_kernel: frames the temporal convolution spans (odd).
    hidden_dim, num_layers, num_heads, mlp_dim, dropout_rate: the frame
      features' width and the temporal Transformer.
    attention: the Transformer's attention settings.
  """
  widths: Sequence[int] = (16, 32)
  conv_attention: str = "cbam"
  reduction: int = 4
  spatial_kernel: int = 7
  temporal: str = "transformer"
  temporal_kernel: int = 3
  hidden_dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None

  @nn.compact
  def __call__(self, video, *, train: bool = False):
    """video ``[batch, frames, height, width, channels]`` -> logits ``[batch, frames]``."""
    if video.ndim != 5:
      raise ValueError(f"KeyframeDetector expects [batch, frames, height, width, channels], "
                       f"got {video.shape}")
    if self.temporal not in TEMPORAL:
      raise ValueError(f"KeyframeDetector: unknown temporal {self.temporal!r}; known: "
                       f"{', '.join(TEMPORAL)}")
    if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
      raise ValueError(f"KeyframeDetector: temporal_kernel must be odd and positive, got "
                       f"{self.temporal_kernel}")
    batch, frames = video.shape[:2]
    features = FrameEncoder(self.widths, self.conv_attention, self.reduction,
                            self.spatial_kernel, self.dtype, name="frames")(
                                video.reshape((batch * frames,) + video.shape[2:]), train=train)
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="frame_projection")(
        features.reshape(batch, frames, -1))
    # Residual, so the frame's own features reach the head unmixed.
    x = x + nn.relu(nn.Conv(self.hidden_dim, (self.temporal_kernel,), padding="SAME",
                            dtype=self.dtype, name="temporal_conv")(x))
    if self.temporal == "transformer":
      x = x + sinusoidal_positions(frames, self.hidden_dim).astype(x.dtype)
      x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate,
                  attention=self.attention, dtype=self.dtype, name="temporal_encoder")(
                      x, deterministic=not train)
    elif self.temporal == "se":
      x = TemporalSqueezeExcite(self.reduction, self.dtype, name="temporal_se")(x)
    # Logits in float32, as in every model here: they feed the loss.
    return nn.Dense(1, dtype=jnp.float32, name="head")(x)[..., 0]
