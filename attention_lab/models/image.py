"""Image classifiers built from the attention layers."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers import Encoder
from attention_lab.layers import LearnedPositionEmbedding


class ViT(nn.Module):
  """Vision Transformer (Dosovitskiy et al.): patches -> tokens -> encoder -> CLS head.

  Attributes:
    num_classes: output logits.
    patch_size: square patch side; image sides must divide by it.
    hidden_dim: token width.
    num_layers, num_heads, mlp_dim: encoder shape.
    dropout_rate, attention_dropout_rate: regularisation.
    kernel: attention kernel name (None: backend default).
    pool: ``cls`` (a learned class token) or ``mean`` (average of patch tokens).
    stem: ``patch`` (one strided convolution: the original linear patch
      embedding) or ``conv`` (stride-2 3x3 convolutions down to the same
      patch grid; Xiao et al. 2021, "Early convolutions help transformers see
      better": easier to optimise and more sample-efficient on small data).
  """
  num_classes: int
  patch_size: int = 4
  hidden_dim: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  kernel: Optional[str] = None
  pool: str = "cls"
  stem: str = "patch"
  dtype: Any = None

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
    x = x.reshape(x.shape[0], -1, self.hidden_dim)       # [batch, patches, hidden]
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_dim)).astype(x.dtype), x], axis=1)
    elif self.pool != "mean":
      raise ValueError(f"ViT: unknown pool {self.pool!r}; use 'cls' or 'mean'")
    x = LearnedPositionEmbedding(name="position_embedding")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = Encoder(
        num_layers=self.num_layers, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, kernel=self.kernel,
        dtype=self.dtype, name="encoder")(x, deterministic=not train)
    x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name="head")(x)
