"""Image classifiers: ViT, a pixel-sequence Transformer, and a ResNet-style CNN
with convolutional attention in every block."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers import conv_attention
from attention_lab.models.token_classifier import TokenClassifier


class ViT(TokenClassifier):
  """Vision Transformer (Dosovitskiy et al.): patches -> tokens -> encoder -> head.

  Attributes (besides ``TokenClassifier``'s):
    patch_size: square patch side; image sides must divide by it.
    stem: ``patch`` (one strided convolution: the original linear patch
      embedding) or ``conv`` (stride-2 3x3 convolutions down to the same
      patch grid; Xiao et al. 2021, "Early convolutions help transformers see
      better": easier to optimise and more sample-efficient on small data).
  """
  patch_size: int = 4
  stem: str = "patch"
  # Its tokens lie on a patch grid: attention.rotary='2d' has rows and columns.
  PATCH_GRID = True

  def _embed(self, images):
    """images -> ``[batch, grid_h, grid_w, hidden_dim]``."""
    p = self.patch_size
    if self.stem == "patch":
      return nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID",
                     dtype=self.dtype, name="patch_embedding")(images)
    if self.stem != "conv":
      raise ValueError(f"ViT: unknown stem {self.stem!r}; use 'patch' or 'conv'")
    if p & (p - 1) or p < 2:
      raise ValueError(f"ViT: the conv stem needs a power-of-two patch_size, got {p}")
    x = images
    stages = p.bit_length() - 1                 # stride-2 convolutions
    for i in range(stages):
      width = self.hidden_dim // 2 ** (stages - 1 - i)
      x = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                  name=f"stem_conv_{i}")(x)
      x = nn.gelu(x)
    return nn.Conv(self.hidden_dim, (1, 1), dtype=self.dtype, name="patch_embedding")(x)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images ``[batch, height, width, channels]`` -> logits ``[batch, num_classes]``."""
    if images.ndim != 4:
      raise ValueError(f"ViT expects [batch, height, width, channels], got {images.shape}")
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f"ViT: image size {height}x{width} is not divisible by patch_size "
          f"{self.patch_size}")
    x = self._embed(images)
    grid = x.shape[1:3]
    x = x.reshape(x.shape[0], -1, self.hidden_dim)       # [batch, patches, hidden]
    return self._classify(x, train, grid=grid)


class PixelTransformer(TokenClassifier):
  """Each pixel a token: the Long Range Arena "Image" task (Tay et al. 2021).

  A grey-scale image becomes a sequence of ``height * width`` intensity tokens
  (1,024 for CIFAR-10, 784 for MNIST) with no 2-D structure given to the
  model: it must learn locality from positions alone, which is what makes the
  task a test of long-range attention.

  Attributes (besides ``TokenClassifier``'s):
    levels: intensity vocabulary; inputs in [0, 1] are quantised to it.
  """
  levels: int = 256

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images ``[batch, height, width, 1]`` in [0, 1] -> logits ``[batch, num_classes]``."""
    if images.ndim != 4 or images.shape[-1] != 1:
      raise ValueError(
          "PixelTransformer expects grey-scale images [batch, height, width, 1], got "
          f"{tuple(images.shape)} (set config.data.grayscale=True for colour data)")
    levels = jnp.round(jnp.clip(images[..., 0], 0.0, 1.0) * (self.levels - 1))
    tokens = levels.astype(jnp.int32).reshape(images.shape[0], -1)   # [batch, pixels]
    x = nn.Embed(self.levels, self.hidden_dim, dtype=self.dtype,
                 name="pixel_embedding")(tokens)
    return self._classify(x, train)


class ResidualBlock(nn.Module):
  """ResNet basic block with convolutional attention on the residual branch.

  ``conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> attention``, added to the
  (projected) input, then ReLU: where SE-ResNet and CBAM place their modules,
  so the gate re-weights what the block adds, not the identity path.

  Attributes:
    width: output channels.
    strides: spatial stride of the first convolution (and the projection).
    conv_attention: ``none``, ``se``, ``eca`` or ``cbam``.
    reduction: ratio ``r`` of SE's and CBAM's channel MLP.
    spatial_kernel: CBAM's spatial convolution size.
  """
  width: int
  strides: int = 1
  conv_attention: str = "none"
  reduction: int = 16
  spatial_kernel: int = 7
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, dtype=self.dtype)
    s = (self.strides, self.strides)
    y = nn.relu(norm(name="norm1")(conv(self.width, (3, 3), strides=s, name="conv1")(x)))
    y = norm(name="norm2")(conv(self.width, (3, 3), name="conv2")(y))
    attention = conv_attention.make(self.conv_attention, reduction=self.reduction,
                                    spatial_kernel=self.spatial_kernel, dtype=self.dtype,
                                    name="attention")
    if attention is not None:
      y = attention(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.width:
      shortcut = norm(name="norm_proj")(
          conv(self.width, (1, 1), strides=s, name="conv_proj")(x))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """A small ResNet with the chosen convolutional attention in every block.

  Stem ``conv3x3 -> BN -> ReLU`` at full resolution, then one stage per entry
  of ``widths`` (the first at stride 1, the others halving the resolution),
  global average pooling and a linear head. ``widths=(64, 128, 256, 512)``,
  ``blocks_per_stage=2`` is ResNet-18 as used for CIFAR.

  Attributes:
    num_classes: output logits.
    widths: channels per stage.
    blocks_per_stage: residual blocks in each stage.
    conv_attention, reduction, spatial_kernel: see ``ResidualBlock``.
  """
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  blocks_per_stage: int = 1
  conv_attention: str = "none"
  reduction: int = 16
  spatial_kernel: int = 7
  dtype: Any = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images ``[batch, height, width, channels]`` -> logits ``[batch, num_classes]``."""
    if images.ndim != 4:
      raise ValueError(f"ResNet expects [batch, height, width, channels], got {images.shape}")
    if self.conv_attention not in conv_attention.CONV_ATTENTIONS:
      raise ValueError(f"ResNet: unknown conv_attention {self.conv_attention!r}; known: "
                       f"{', '.join(conv_attention.CONV_ATTENTIONS)}")
    x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False,
                dtype=self.dtype, name="stem_conv")(images)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                     name="stem_norm")(x)
    x = nn.relu(x)
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        x = ResidualBlock(
            width, strides=2 if stage > 0 and block == 0 else 1,
            conv_attention=self.conv_attention, reduction=self.reduction,
            spatial_kernel=self.spatial_kernel, dtype=self.dtype,
            name=f"stage{stage}_block{block}")(x, train=train)
    x = x.mean(axis=(1, 2))
    # Logits in float32, as in every model here: they feed the softmax, and
    # the head is one small matrix.
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)
