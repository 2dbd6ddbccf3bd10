"""Bahdanau (additive) and Luong (multiplicative) attention: one query per
step, an RNN decoder state, over a sequence of encoder states.

The score functions are pure (parameters passed in) and sit beside the modules
that own their parameters. Shapes: ``query [batch..., q_length, q_features]``,
``keys [batch..., kv_length, k_features]`` -> ``scores [batch..., q_length,
kv_length]``. They are not the fused kernels' contract (``kernels``): no heads,
and one query row per decoder step.

Mixed precision: with ``dtype`` set, parameters (float32) and inputs are cast
to it for the scores and the weighted sum; the softmax runs in float32 and the
weights come out (and are sown) in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.kernels.softmax import masked_softmax


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



def _check_last_dims(query, keys, name):
  if query.shape[-1] != keys.shape[-1]:
    raise ValueError(
        f"{name}_scores: query features {query.shape[-1]} != key features "
        f"{keys.shape[-1]} (query {query.shape}, keys {keys.shape})")


def attend(module, scores, values, mask):
  """Masked softmax over keys, weighted sum of values, weights sown by ``module``
  as ``attention_weights`` ``[batch, q, kv]`` (the rank-3 layout the pictures
  read as one-query-per-step attention).

  Args:
    scores: ``[batch, q, kv]``.
    values: ``[batch, kv, dv]``.
    mask: bool ``[batch, kv]``, True = valid key; None: every key.

  Returns:
    context ``[batch, q, dv]`` in ``values``' dtype and float32 weights
    ``[batch, q, kv]``.
  """
  if mask is not None:
    mask = jnp.asarray(mask, bool)[..., None, :]
  weights = masked_softmax(scores, mask)         # float32
  module.sow("intermediates", "attention_weights", weights)
  # Products in the values' dtype, the sum over keys accumulated in float32
  # (the same numbers as before for float32 values).
  context = jnp.einsum("...qk,...kd->...qd", weights.astype(values.dtype), values,
                       preferred_element_type=jnp.float32)
  return context.astype(values.dtype), weights


def _as_queries(query):
  """Accepts ``[batch, d]`` (one query) or ``[batch, q, d]``."""
  single = query.ndim == 2
  return (query[:, None, :] if single else query), single


class AdditiveAttention(nn.Module):
  """Bahdanau attention: ``score(q, k) = v^T tanh(W q + U k + b)``.

  Attributes:
    units: width of the hidden layer inside the score.
    dtype: compute dtype of the scores and the context (None: the inputs').
  """
  units: int
  dtype: Any = None

  @nn.compact
  def __call__(self, query, keys, values=None, mask=None):
    """Attends from ``query`` to ``keys``.

    Args:
      query: ``[batch, q_features]`` or ``[batch, q_length, q_features]``.
      keys: ``[batch, kv_length, k_features]``.
      values: ``[batch, kv_length, v_features]`` (default: ``keys``).
      mask: bool ``[batch, kv_length]``, True = valid key.

    Returns:
      context ``[batch, (q_length,) v_features]`` and weights
      ``[batch, (q_length,) kv_length]``.
    """
    values = keys if values is None else values
    queries, single = _as_queries(query)
    init = nn.initializers.lecun_normal()
    w = self.param("query_weight", init, (queries.shape[-1], self.units))
    u = self.param("key_weight", init, (keys.shape[-1], self.units))
    b = self.param("bias", nn.initializers.zeros, (self.units,))
    v = self.param("energy_weight", nn.initializers.normal(self.units ** -0.5),
                   (self.units,))
    queries, keys, values, w, u, v, b = nn.dtypes.promote_dtype(
        queries, keys, values, w, u, v, b, dtype=self.dtype)
    scores = additive_scores(queries, keys, w, u, v, b)
    context, weights = attend(self, scores, values, mask)
    return (context[:, 0], weights[:, 0]) if single else (context, weights)


class LuongAttention(nn.Module):
  """Luong attention with ``dot`` (``q . k``) or ``general`` (``q W k``) scores.

  Attributes:
    score: ``dot`` or ``general``.
    dtype: compute dtype of the scores and the context (None: the inputs').
  """
  score: str = "general"
  dtype: Any = None

  @nn.compact
  def __call__(self, query, keys, values=None, mask=None):
    """Same arguments and returns as ``AdditiveAttention``."""
    values = keys if values is None else values
    queries, single = _as_queries(query)
    if self.score not in ("dot", "general"):
      raise ValueError(
          f"LuongAttention: unknown score {self.score!r}; use 'dot' or 'general'")
    w = None
    if self.score == "general":
      w = self.param("weight", nn.initializers.lecun_normal(),
                     (queries.shape[-1], keys.shape[-1]))
    queries, keys, values, w = nn.dtypes.promote_dtype(queries, keys, values, w,
                                                       dtype=self.dtype)
    if self.score == "dot":
      scores = dot_scores(queries, keys)
    else:
      scores = general_scores(queries, keys, w)
    context, weights = attend(self, scores, values, mask)
    return (context[:, 0], weights[:, 0]) if single else (context, weights)
