"""Masked softmax and log-sum-exp in float32: the row math of the
materialised kernels (``reference``, ``jax_nn``) and of the one-query-per-step
layers (``layers.recurrent_attention``, ``layers.pooling``).

Both take True = attend and treat a ``-inf`` logit as a hidden key, so a row
with no visible key gives zeros (softmax) or ``-inf`` (log-sum-exp), never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(scores, mask=None, axis: int = -1):
  """Softmax in float32 (at least) with True = attend; all-masked rows give zeros.

  Args:
    scores: ``[..., kv_length]`` logits, any float dtype.
    mask: bool, broadcastable to ``scores``; ``None`` attends everywhere.

  Returns:
    weights of dtype ``promote(scores.dtype, float32)``; rows whose keys are
    all masked are exactly zero (never NaN, never uniform).
  """
  compute_dtype = jnp.promote_types(scores.dtype, jnp.float32)
  scores = scores.astype(compute_dtype)
  # A -inf logit (an additive -inf bias) hides its key just as the mask does,
  # so a row of -inf logits is an all-masked row: zeros, not NaN.
  finite_or_pos = scores != -jnp.inf
  if mask is None:
    mask = finite_or_pos
  else:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), scores.shape) & finite_or_pos
  # The max is taken over valid entries only, so a row of huge masked logits
  # cannot underflow the valid ones; a fully masked row gets max 0 and sum 0.
  neg_inf = jnp.asarray(-jnp.inf, compute_dtype)
  row_max = jnp.max(jnp.where(mask, scores, neg_inf), axis=axis, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  row_max = jax.lax.stop_gradient(row_max)
  # Masked logits are replaced before exp: an overflow there would turn the
  # (unused) branch's gradient into NaN.
  safe = jnp.where(mask, scores, row_max)
  exp = jnp.where(mask, jnp.exp(safe - row_max), 0.0)
  denom = jnp.sum(exp, axis=axis, keepdims=True)
  return exp / jnp.where(denom > 0, denom, 1.0)


def masked_logsumexp(scores, mask=None, axis: int = -1):
  """``log(sum(exp(scores)))`` over the attended entries (True = attend).

  The log-sum-exp of a softmax row (FlashAttention-2's residual). Computed in
  ``promote(scores.dtype, float32)``; a row with no attended entry (masked, or
  all ``-inf``) gives ``-inf``, the log of an empty sum, with zero gradient.

  Args:
    scores: any shape, e.g. ``[batch..., heads, q_length, kv_length]``.
    mask: bool (True = attend), broadcastable to ``scores.shape``; or None.
    axis: the axis summed over (the keys).

  Returns:
    ``scores.shape`` without ``axis``.
  """
  compute_dtype = jnp.promote_types(scores.dtype, jnp.float32)
  scores = scores.astype(compute_dtype)
  valid = scores != -jnp.inf
  if mask is not None:
    valid = valid & jnp.broadcast_to(jnp.asarray(mask, bool), scores.shape)
  row_max = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=axis, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  total = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, scores, row_max) - row_max), 0.0),
                  axis=axis, keepdims=True)
  has_key = total > 0
  lse = jnp.where(has_key, row_max + jnp.log(jnp.where(has_key, total, 1.0)), -jnp.inf)
  return jnp.squeeze(lse, axis)
