"""Plain scaled dot-product attention: the numerical ground truth.

It materialises the ``[batch..., heads, q_length, kv_length]`` weights, so its
memory grows with ``length**2``; every other kernel is tested against it (in
float64 where the test asks for it: the compute dtype is
``promote(input dtype, float32)``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attention_lab.kernels import checks
from attention_lab.kernels import masks as masks_lib
from attention_lab.kernels import mods as mods_lib
from attention_lab.kernels.softmax import masked_logsumexp
from attention_lab.kernels.softmax import masked_softmax


def full_mask(shape: checks.AttentionShape, mask=None, is_causal=False,
              local_window_size=None):
  """Combines a user mask with the causal and window forms.

  Returns:
    bool broadcastable to ``[batch..., heads, q_length, kv_length]`` or None.
  """
  causal = (masks_lib.causal_mask(shape.q_length, shape.kv_length)
            if is_causal else None)
  window = (masks_lib.sliding_window_mask(shape.q_length, shape.kv_length,
                                          local_window_size)
            if local_window_size is not None else None)
  return masks_lib.combine_masks(mask, causal, window)


def repeat_kv_heads(x, heads: int):
  """``[..., kv_length, kv_heads, d]`` -> ``[..., kv_length, heads, d]``."""
  kv_heads = x.shape[-2]
  return x if kv_heads == heads else jnp.repeat(x, heads // kv_heads, axis=-2)


def heads_major(x, batch_dims: int, length: int, width=None):
  """``[batch..., t, n, d]`` -> ``[prod(batch), n, length, width]``, zero-padded.

  The layout the fused kernels tile: each (sequence, head) a plain matrix.
  Zero rows and columns change neither scores nor outputs that are sliced off.
  """
  x = x.reshape((-1,) + x.shape[batch_dims:])
  x = jnp.swapaxes(x, 1, 2)
  width = x.shape[3] if width is None else width
  return jnp.pad(x, [(0, 0), (0, 0), (0, length - x.shape[2]), (0, width - x.shape[3])])


def attention_logits(query, key, bias=None, *, scale=None, precision=None):
  """Scaled scores plus bias, ``[batch..., heads, q_length, kv_length]``, in
  ``promote(dtype, float32)``."""
  compute = jnp.promote_types(query.dtype, jnp.float32)
  heads = query.shape[-2]
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  key = repeat_kv_heads(key, heads)
  logits = jnp.einsum("...tnh,...snh->...nts", query.astype(compute),
                      key.astype(compute), precision=precision) * scale
  if bias is not None:
    logits = logits + bias.astype(compute)
  return logits


def modded_logits(query, key, bias, mask, shape: checks.AttentionShape, *, scale=None,
                  is_causal=False, local_window_size=None, precision=None,
                  score_mod=None, mask_mod=None):
  """Logits after ``score_mod`` and the combined mask (``mask``, causal,
  window, ``mask_mod``): the definition every kernel's mods are checked
  against (``attention_lab.kernels.mods``).

  Returns:
    ``(logits [batch..., heads, q_length, kv_length], mask or None)``.
  """
  logits = attention_logits(query, key, bias, scale=scale, precision=precision)
  mod_mask = None
  if score_mod is not None or mask_mod is not None:
    logits, mod_mask = mods_lib.apply_dense(logits, score_mod, mask_mod)
  return logits, masks_lib.combine_masks(
      full_mask(shape, mask, is_causal, local_window_size), mod_mask)


def attention_weights(query, key, bias=None, mask=None, *, scale=None,
                      is_causal=False, local_window_size=None, precision=None,
                      score_mod=None, mask_mod=None):
  """Softmax weights ``[batch..., heads, q_length, kv_length]``.

  Computed in ``promote(dtype, float32)``; rows with no valid key are zero.
  This is what pictures show, whatever kernel ran the model.
  """
  value_stub = key[..., :0]  # only shapes matter for the check
  shape = checks.check_inputs(query, key, value_stub, mask, bias,
                              who="attention_weights")
  return masked_softmax(*modded_logits(
      query, key, bias, mask, shape, scale=scale, is_causal=is_causal,
      local_window_size=local_window_size, precision=precision,
      score_mod=score_mod, mask_mod=mask_mod))


def reference_attention(query, key, value, bias=None, mask=None, *,
                        scale: Optional[float] = None, is_causal: bool = False,
                        local_window_size=None, dropout_rate: float = 0.0,
                        dropout_rng=None, broadcast_dropout: bool = True,
                        precision=None, return_weights: bool = False,
                        return_residual: bool = False, score_mod=None, mask_mod=None):
  """Scaled dot-product attention, materialised.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``.
    value: ``[batch..., kv_length, kv_heads, value_dim]``.
    bias: float, broadcastable to ``[batch..., heads, q_length, kv_length]``.
    mask: bool, same broadcasting; True = attend.
    scale: logit scale, default ``head_dim ** -0.5``.
    is_causal: hide keys after the query position (start-aligned, as jax.nn).
    local_window_size: ``w`` or ``(left, right)`` band around each query.
    dropout_rate: dropout on the weights (Flax semantics); needs
      ``dropout_rng`` when > 0.
    broadcast_dropout: share the dropout mask across batch and heads.
    return_weights: also return the weights.
    return_residual: also return the log-sum-exp of each query's scores,
      ``[batch..., q_length, heads]`` (``-inf`` where a query has no key).
    score_mod / mask_mod: FlexAttention-style hooks
      (``attention_lab.kernels.mods``), applied to the whole score matrix:
      this is their definition.

  Returns:
    ``[batch..., q_length, heads, value_dim]`` in the query dtype, then the
    float32 (at least) weights when ``return_weights``, then the residual
    when ``return_residual``.
  """
  shape = checks.check_inputs(query, key, value, mask, bias,
                              who="reference_attention")
  logits, visible = modded_logits(query, key, bias, mask, shape, scale=scale,
                                  is_causal=is_causal, local_window_size=local_window_size,
                                  precision=precision, score_mod=score_mod, mask_mod=mask_mod)
  weights = masked_softmax(logits, visible)
  used = weights
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("reference_attention: dropout_rate > 0 needs dropout_rng")
    keep_prob = 1.0 - dropout_rate
    drop_shape = ((1,) * (weights.ndim - 2) + weights.shape[-2:]
                  if broadcast_dropout else weights.shape)
    keep = jax.random.bernoulli(dropout_rng, keep_prob, drop_shape)
    used = weights * keep.astype(weights.dtype) / keep_prob
  value = repeat_kv_heads(value, shape.heads).astype(weights.dtype)
  out = jnp.einsum("...nts,...snh->...tnh", used, value, precision=precision)
  out = out.astype(query.dtype)
  extra = (weights,) if return_weights else ()
  if return_residual:
    lse = masked_logsumexp(logits, visible)
    extra += (jnp.swapaxes(lse, -1, -2),)                  # [batch..., q, heads]
  return (out,) + extra if extra else out
