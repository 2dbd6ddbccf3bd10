"""Multi-head attention modules: parameters here, math in ``attention_lab.kernels``.

Parameter names (``query``, ``key``, ``value``, ``out``) and layouts match
``flax.linen.MultiHeadDotProductAttention``, so weights move between the two.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from attention_lab import kernels
from attention_lab.kernels import masks


class MultiHeadAttention(nn.Module):
  """Multi-head scaled dot-product attention through a registered kernel.

  Attributes:
    num_heads: number of heads; ``qkv_features`` must divide by it.
    qkv_features: width of the projections (default: the query input width).
    out_features: output width (default: the query input width).
    kernel: registry name (``attention_lab.kernels.names()``), or None for the
      backend's default kernel.
    dropout_rate: dropout on the attention weights.
    is_causal: causal self-attention.
    local_window_size: ``w`` or ``(left, right)`` band, or None.
    use_bias: biases in the projections.

  When the ``intermediates`` collection is mutable, the softmax weights
  ``[batch, heads, q_length, kv_length]`` are sown as ``attention_weights``,
  recomputed from this layer's queries and keys (with ``mask`` and the
  padding of the lengths applied), so they are the same whichever kernel ran.

  Padding travels as lengths (``kv_lengths``, ``q_lengths``), which the fused
  kernels (splash, pallas) take; a dense ``mask`` sends dispatch to a
  materialised kernel, so keep it for patterns lengths cannot express.
  """
  num_heads: int
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  kernel: Optional[str] = None
  dropout_rate: float = 0.0
  is_causal: bool = False
  local_window_size: Any = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, mask=None, bias=None,
               q_lengths=None, kv_lengths=None, deterministic: bool = True):
    """Attends from ``inputs_q [batch, q_length, features]`` to ``inputs_kv``.

    Args:
      inputs_q: ``[batch..., q_length, q_features]``.
      inputs_kv: ``[batch..., kv_length, kv_features]``; None = self-attention.
      mask: bool broadcastable to ``[batch..., heads, q_length, kv_length]``.
      bias: float, same broadcasting.
      q_lengths: int ``[batch...]``, valid prefix of the queries: attention
        outputs past it are zeros (and so are their sown weight rows). Without
        it padded query rows attend as any other row.
      kv_lengths: int ``[batch...]``, valid prefix of the keys (trailing
        padding): keys at or past it are hidden, as by the mask
        ``arange(kv_length) < kv_lengths``, but fused kernels still run.
      deterministic: disables dropout.

    Returns:
      ``[batch..., q_length, out_features]``.
    """
    if inputs_kv is None:
      inputs_kv = inputs_q
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(
          f"MultiHeadAttention: qkv_features {features} is not divisible by "
          f"num_heads {self.num_heads}")
    head_dim = features // self.num_heads
    project = lambda name: nn.DenseGeneral(
        features=(self.num_heads, head_dim), use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    query = project("query")(inputs_q)      # [batch..., q, heads, head_dim]
    key = project("key")(inputs_kv)
    value = project("value")(inputs_kv)

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    out = kernels.dot_product_attention(
        query, key, value, bias, mask, is_causal=self.is_causal,
        local_window_size=self.local_window_size, implementation=self.kernel,
        q_lengths=q_lengths, kv_lengths=kv_lengths,
        dropout_rate=self.dropout_rate if use_dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if use_dropout else None,
        deterministic=not use_dropout)
    if self.is_mutable_collection("intermediates"):
      padding = masks.combine_masks(
          mask,
          None if kv_lengths is None else masks.key_padding_mask(kv_lengths, key.shape[-3]),
          None if q_lengths is None
          else masks.padding_mask(q_lengths, query.shape[-3])[..., None, :, None])
      self.sow("intermediates", "attention_weights", kernels.attention_weights(
          query, key, bias, padding, is_causal=self.is_causal,
          local_window_size=self.local_window_size, implementation=self.kernel))
    return nn.DenseGeneral(
        features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name="out")(out)


class SelfAttention(MultiHeadAttention):
  """Self-attention: queries, keys and values all come from ``inputs``.

  For trailing padding pass ``kv_lengths`` (padded keys hidden, padded query
  rows still computed, as the mask ``valid[:, None, None, :]`` does); add
  ``q_lengths`` to zero the padded rows too.
  """

  @nn.compact
  def __call__(self, inputs, *, mask=None, bias=None, q_lengths=None,
               kv_lengths=None, deterministic=True):
    return super().__call__(inputs, None, mask=mask, bias=bias, q_lengths=q_lengths,
                            kv_lengths=kv_lengths, deterministic=deterministic)


class CrossAttention(MultiHeadAttention):
  """Cross-attention: queries from ``inputs``, keys and values from ``context``
  (``kv_lengths``: the valid prefix of ``context``)."""

  @nn.compact
  def __call__(self, inputs, context, *, mask=None, bias=None, q_lengths=None,
               kv_lengths=None, deterministic=True):
    return super().__call__(inputs, context, mask=mask, bias=bias, q_lengths=q_lengths,
                            kv_lengths=kv_lengths, deterministic=deterministic)
