"""Score functions of basic attention and the masked softmax that turns scores into weights.

All functions are pure: parameters are passed in explicitly, so Flax modules
(``attention_lab.layers.additive``) own them and these functions own the math.

Shapes: ``query [batch..., q_length, q_features]``,
``keys [batch..., kv_length, k_features]`` -> ``scores [batch..., q_length, kv_length]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_scores(query, keys):
  """Luong "dot": ``q . k``. Needs ``q_features == k_features``."""
  _check_last_dims(query, keys, "dot")
  return jnp.einsum("...qd,...kd->...qk", query, keys)


def scaled_dot_scores(query, keys, scale=None):
  """Transformer scores ``q . k * scale``; ``scale`` defaults to ``1/sqrt(d)``."""
  _check_last_dims(query, keys, "scaled_dot")
  if scale is None:
    scale = query.shape[-1] ** -0.5
  return dot_scores(query, keys) * scale


def general_scores(query, keys, weight):
  """Luong "general": ``q W k``.

  Args:
    weight: ``[q_features, k_features]``.
  """
  if weight.shape != (query.shape[-1], keys.shape[-1]):
    raise ValueError(
        f"general_scores: weight shape {weight.shape} does not match "
        f"(query features, key features) = ({query.shape[-1]}, {keys.shape[-1]})")
  return jnp.einsum("...qd,de,...ke->...qk", query, weight, keys)


def additive_scores(query, keys, query_weight, key_weight, energy_weight,
                    bias=None):
  """Bahdanau: ``v^T tanh(W q + U k + b)``.

  Args:
    query_weight: ``W``, ``[q_features, units]``; ``None`` when the query is
      already in ``units`` (attention pooling's learned query).
    key_weight: ``U``, ``[k_features, units]``.
    energy_weight: ``v``, ``[units]``.
    bias: optional ``[units]``.

  The key projection does not depend on the query, so RNN decoders can pass
  keys that are already projected (``key_weight=None``) once per sequence.
  """
  projected_q = query if query_weight is None else query @ query_weight
  projected_k = keys if key_weight is None else keys @ key_weight
  if projected_q.shape[-1] != projected_k.shape[-1]:
    raise ValueError(
        f"additive_scores: query projects to {projected_q.shape[-1]} units "
        f"but keys to {projected_k.shape[-1]}")
  hidden = projected_q[..., :, None, :] + projected_k[..., None, :, :]
  if bias is not None:
    hidden = hidden + bias
  return jnp.tanh(hidden) @ energy_weight               # [..., q, k]


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


def _check_last_dims(query, keys, name):
  if query.shape[-1] != keys.shape[-1]:
    raise ValueError(
        f"{name}_scores: query features {query.shape[-1]} != key features "
        f"{keys.shape[-1]} (query {query.shape}, keys {keys.shape})")
