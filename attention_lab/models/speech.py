"""Spoken-command classifiers over raw one-second clips.

Both start with the JAX log-mel front end (``layers.spectrogram``), so the
spectrogram is computed on the accelerator inside the jitted step:

- ``KeywordTransformer`` (KWT, Berg et al. 2021): every time frame is a
  token, a CLS token in front, a Transformer encoder.
- ``ConformerClassifier``: convolutional subsampling, Conformer blocks
  (Gulati et al. 2020) and additive attention pooling over time.

Inputs are int16 (or float) ``[batch, samples]``; outputs logits
``[batch, num_classes]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers import AttentionConfig
from attention_lab.layers import AttentionPooling
from attention_lab.layers.conformer import ConformerBlock
from attention_lab.layers.conformer import with_relative_bias
from attention_lab.layers.spectrogram import LogMelFrontEnd
from attention_lab.layers.spectrogram import LogMelSettings
from attention_lab.models.token_classifier import TokenClassifier


def _log_mel(module, audio, train: bool):
  """The front end a speech model's fields describe: clips ``[batch, samples]``
  -> normalised log-mel ``[batch, frames, num_mels]`` in the model's dtype
  (computed in float32)."""
  if audio.ndim != 2:
    raise ValueError(f"{type(module).__name__} expects audio clips [batch, samples], "
                     f"got shape {tuple(audio.shape)}")
  return LogMelFrontEnd(**module.front_end_settings(), dtype=module.dtype,
                        name="front_end")(audio, train=train)


class KeywordTransformer(TokenClassifier, LogMelSettings):
  """KWT: log-mel frames as tokens (98 per second at a 10 ms hop), CLS, encoder.

  Attributes: ``TokenClassifier``'s and the front end's (``LogMelSettings``:
  ``num_mels`` bands per frame, frequency warp and SpecAugment in training).
  """

  @nn.compact
  def __call__(self, audio, *, train: bool = False):
    """audio ``[batch, samples]`` -> logits ``[batch, num_classes]``."""
    frames = _log_mel(self, audio, train)
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="frame_embedding")(frames)
    return self._classify(x, train)


class ConformerClassifier(LogMelSettings):
  """Conformer encoder with attention pooling over time.

  Two 3x3 stride-2 convolutions subsample the spectrogram four times in
  time and frequency (98 frames -> 23), which is where a Conformer spends
  its attention budget in speech recognition too.

  Attributes:
    num_classes: output logits.
    hidden_dim, num_layers, num_heads, mlp_dim: encoder shape.
    conv_kernel_size: the Conformer convolution's width (in subsampled frames).
    subsample_channels: channels of the subsampling convolutions.
    attention_units: hidden width of the additive pooling score.
    max_distance: relative positions beyond it share a bias (each block's
      attention learns a ``[heads, 2 * max_distance + 1]`` table, applied as
      the ``relative_bias`` score_mod; an ``attention.score_mod`` set in the
      config replaces it).
    num_mels, max_warp, time_masks, time_width, freq_masks, freq_width: the
      front end's (``LogMelSettings``), keyword-only.
    attention: the blocks' attention settings (``AttentionConfig``).
    dtype: compute dtype after the front end (None: float32); the front end,
      parameters and logits are float32.
  """
  num_classes: int
  hidden_dim: int = 96
  num_layers: int = 3
  num_heads: int = 4
  mlp_dim: int = 384
  conv_kernel_size: int = 15
  subsample_channels: int = 32
  attention_units: int = 64
  max_distance: int = 32
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None

  @nn.compact
  def __call__(self, audio, *, train: bool = False):
    """audio ``[batch, samples]`` -> logits ``[batch, num_classes]``.

    The pooling weights over subsampled frames ``[batch, 1, frames]`` are
    sown as ``attention_weights`` (besides each block's self-attention).
    """
    x = _log_mel(self, audio, train)[..., None]            # [batch, frames, mels, 1]
    for i in range(2):
      x = nn.relu(nn.Conv(self.subsample_channels, (3, 3), strides=(2, 2), padding="VALID",
                          dtype=self.dtype, name=f"subsample{i}")(x))
    batch, frames = x.shape[:2]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="project")(x.reshape(batch, frames, -1))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    # Per block, not one table shared by all: each layer learns its own
    # distance profile (Shaw et al. 2018), for 2 * (2D + 1) * heads more
    # parameters, through the same config path as any other score_mod.
    attention = with_relative_bias(self.attention, self.max_distance)
    for i in range(self.num_layers):
      x = ConformerBlock(self.num_heads, self.mlp_dim, self.conv_kernel_size,
                         self.dropout_rate, attention, self.dtype,
                         name=f"block{i}")(x, train=train)
    pooled, _ = AttentionPooling(self.attention_units, dtype=self.dtype, name="pooling")(x)
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)   # float32 logits
