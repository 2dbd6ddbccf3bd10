"""DETR: object detection as a set prediction with a Transformer
(Carion et al., 2020, "End-to-End Object Detection with Transformers").

``images [batch, height, width, channels]`` -> per decoder layer, class
logits ``[layers, batch, queries, num_classes + 1]`` (the last class is
"no object") and boxes ``[layers, batch, queries, 4]`` (normalised ``ymin,
xmin, ymax, xmax``, TFDS's order). The last layer's are the detections;
the earlier layers' feed the auxiliary losses (``train/tasks.py``).

1. A CNN backbone (``image.ResidualBlock`` stages, each halving the
   resolution) turns the image into a feature grid, projected to
   ``hidden_dim``.
2. A Transformer encoder (``layers.Encoder``) over the grid's cells, with
   fixed 2-D sine positional encodings added to its input (DETR adds them at
   every layer; once is enough at these sizes and lets the encoder be the
   project's shared one).
3. A decoder of ``num_queries`` learned object queries: self-attention among
   the queries (so they can agree who predicts which object), cross-attention
   from the queries to the encoded grid plus its positions (the weights
   ``[batch, heads, queries, cells]`` are sown as ``attention_weights``: where
   each query looks), an MLP. Each query's learned position embedding is
   added to its queries at every layer, as in DETR.
4. Shared heads on every decoder layer's output: a linear class head and an
   MLP box head. The box's centre is predicted as an offset, in logit space,
   from a learned reference point per query (as Deformable DETR does), which
   spreads the queries over the image from the start and speeds up training.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention_lab.layers import AttentionConfig
from attention_lab.layers import CrossAttention
from attention_lab.layers import Encoder
from attention_lab.layers import SelfAttention
from attention_lab.layers.transformer import MlpBlock
from attention_lab.models.image import ResidualBlock


def sine_positions_2d(height: int, width: int, features: int,
                      temperature: float = 1e4) -> np.ndarray:
  """DETR's 2-D sine encodings of a ``height x width`` grid, flattened row by
  row: ``[height * width, features]``. The first half encodes the row, the
  second the column, each as sin/cos pairs of the normalised coordinate
  (cell centres in (0, 2 pi)) at geometrically spaced frequencies."""
  if features % 4:
    raise ValueError(f"sine_positions_2d: features {features} must divide by 4 "
                     f"(sin and cos of rows and of columns)")
  quarter = features // 4
  frequencies = temperature ** (-np.arange(quarter) / quarter)
  rows = (np.arange(height) + 0.5) / height * 2 * np.pi
  cols = (np.arange(width) + 0.5) / width * 2 * np.pi

  def encode(coordinate):                      # [n] -> [n, features / 2]
    angles = coordinate[:, None] * frequencies
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
  row_code = np.repeat(encode(rows), width, axis=0)       # row-major cells
  col_code = np.tile(encode(cols), (height, 1))
  return np.concatenate([row_code, col_code], axis=-1).astype(np.float32)


def boxes_to_corners(centre_size):
  """``[..., 4]`` (cy, cx, h, w) -> (ymin, xmin, ymax, xmax)."""
  centre, size = centre_size[..., :2], centre_size[..., 2:]
  return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


class QueryDecoderBlock(nn.Module):
  """Pre-norm DETR decoder block: self-attention among the queries,
  cross-attention to the image's cells, MLP; ``query_positions`` is added to
  the queries' inputs of both attentions, ``memory_positions`` to the cells'."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None

  @nn.compact
  def __call__(self, y, query_positions, memory, memory_positions, *,
               deterministic: bool = True):
    """``y [batch, queries, features]``, ``query_positions [queries,
    features]``, ``memory [batch, cells, features]``, ``memory_positions
    [cells, features]`` -> ``y``'s shape."""
    dropout = nn.Dropout(self.dropout_rate)
    attended = SelfAttention(num_heads=self.num_heads, attention=self.attention,
                             dtype=self.dtype, name="self_attention")(
        nn.LayerNorm(dtype=self.dtype, name="self_norm")(y) + query_positions,
        deterministic=deterministic)
    y = y + dropout(attended, deterministic=deterministic)
    attended = CrossAttention(num_heads=self.num_heads, attention=self.attention,
                              dtype=self.dtype, name="cross_attention")(
        nn.LayerNorm(dtype=self.dtype, name="cross_norm")(y) + query_positions,
        memory + memory_positions, deterministic=deterministic)
    y = y + dropout(attended, deterministic=deterministic)
    return y + MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype, name="mlp")(
        nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(y), deterministic=deterministic)


class DETR(nn.Module):
  """Detection Transformer (see the module docstring).

  Attributes:
    num_classes: object classes; the logits have one more, "no object".
    stem_stride: the stride of the backbone's first convolution (its
      channels are ``widths[0]``).
    widths: the backbone's channels per stage; each stage halves the
      resolution (64x64 images, stem stride 2 and two stages: an 8x8 grid).
    hidden_dim: the Transformer's width.
    num_encoder_layers, num_decoder_layers, num_heads, mlp_dim, dropout_rate:
      the Transformer.
    num_queries: object queries, the most objects one image can yield.
    attention: the attention settings of every attention layer.
  """
  num_classes: int = 10
  stem_stride: int = 2
  widths: Sequence[int] = (32, 64)
  hidden_dim: int = 96
  num_encoder_layers: int = 2
  num_decoder_layers: int = 3
  num_heads: int = 4
  mlp_dim: int = 192
  num_queries: int = 12
  dropout_rate: float = 0.0
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images ``[batch, height, width, channels]`` -> ``{"logits": [layers,
    batch, queries, num_classes + 1], "boxes": [layers, batch, queries, 4]}``
    (float32; boxes normalised ``ymin, xmin, ymax, xmax``)."""
    if images.ndim != 4:
      raise ValueError(f"DETR expects images [batch, height, width, channels], got "
                       f"{images.shape}")
    if self.hidden_dim % 4:
      raise ValueError(f"DETR: hidden_dim {self.hidden_dim} must divide by 4 (2-D sine "
                       f"positions)")
    x = nn.Conv(self.widths[0], (3, 3), strides=(self.stem_stride,) * 2, padding="SAME",
                use_bias=False, dtype=self.dtype, name="stem_conv")(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             name="stem_norm")(x))
    for stage, width in enumerate(self.widths):
      x = ResidualBlock(width, strides=2, dtype=self.dtype, name=f"stage{stage}")(
          x, train=train)
    batch, height, width = x.shape[:3]
    cells = nn.Dense(self.hidden_dim, dtype=self.dtype, name="input_projection")(
        x.reshape(batch, height * width, -1))
    positions = jnp.asarray(sine_positions_2d(height, width, self.hidden_dim), cells.dtype)
    memory = Encoder(self.num_encoder_layers, self.num_heads, self.mlp_dim,
                     self.dropout_rate, attention=self.attention, dtype=self.dtype,
                     name="encoder")(cells + positions, deterministic=not train)

    query_positions = self.param("query_embedding", nn.initializers.normal(1.0),
                                 (self.num_queries, self.hidden_dim)).astype(memory.dtype)
    # Spread over the image: a 2-D grid-like start is left to the initialiser's
    # randomness, uniform in (0.05, 0.95) on both axes.
    reference = self.param("reference_points",
                           lambda key, shape: jax.random.uniform(key, shape, minval=0.05,
                                                                 maxval=0.95),
                           (self.num_queries, 2))
    y = jnp.zeros((batch, self.num_queries, self.hidden_dim), memory.dtype)
    # Logits in float32, as in every model here: they feed the loss.
    class_head = nn.Dense(self.num_classes + 1, dtype=jnp.float32, name="class_head")
    box_hidden = [nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"box_hidden{i}")
                  for i in range(2)]
    # Zeros: every query starts at its reference point with the prior size.
    box_out = nn.Dense(4, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name="box_out")
    out_norm = nn.LayerNorm(dtype=self.dtype, name="decoder_norm")
    logits, boxes = [], []
    for i in range(self.num_decoder_layers):
      y = QueryDecoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                            attention=self.attention, dtype=self.dtype,
                            name=f"decoder_{i}")(y, query_positions, memory, positions,
                                                 deterministic=not train)
      h = out_norm(y)
      logits.append(class_head(h))
      z = h
      for dense in box_hidden:
        z = nn.relu(dense(z))
      # The offsets leave the compute dtype here: the sigmoids and the
      # boxes, which feed the loss, are float32.
      delta = box_out(z).astype(jnp.float32)
      centre = jax.nn.sigmoid(delta[..., :2] + jax.scipy.special.logit(reference))
      # The size starts at sigmoid(-2) = 0.12 of the image, about a digit's.
      size = jax.nn.sigmoid(delta[..., 2:] - 2.0)
      boxes.append(boxes_to_corners(jnp.concatenate([centre, size], axis=-1)))
    return {"logits": jnp.stack(logits).astype(jnp.float32),
            "boxes": jnp.stack(boxes).astype(jnp.float32)}
