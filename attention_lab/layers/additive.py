"""Basic attention: Bahdanau (additive) and Luong (multiplicative), and attention pooling.

These attend from one query vector per step (an RNN decoder state, or a learned
pooling query) over a sequence of encoder states. The score math is in
``attention_lab.kernels.scores``; these modules hold the parameters.

Mixed precision: with ``dtype`` set, parameters (float32) and inputs are cast
to it for the scores and the weighted sum; the softmax runs in float32 and the
weights come out (and are sown) in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.kernels import scores as scores_lib


def _attend(module, scores, values, mask):
  """Masked softmax over keys, weighted sum of values, weights sown.

  scores ``[batch, q, kv]``, values ``[batch, kv, dv]``, mask ``[batch, kv]``.
  """
  if mask is not None:
    mask = jnp.asarray(mask, bool)[..., None, :]
  weights = scores_lib.masked_softmax(scores, mask)         # float32
  module.sow("intermediates", "attention_weights", weights)
  # Products in the values' dtype, the sum over keys accumulated in float32
  # (the same numbers as before for float32 values).
  context = jnp.einsum("...qk,...kd->...qd", weights.astype(values.dtype), values,
                       preferred_element_type=jnp.float32)
  return context.astype(values.dtype), weights


def masked_mean(x, valid):
  """Mean of ``x [batch, length, features]`` over the positions where
  ``valid [batch, length]`` is True; zeros for a row with none. Summed in
  float32 (a bfloat16 sum of thousands of positions loses digits), returned in
  ``x``'s dtype."""
  total = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  weights = valid.astype(total.dtype)[..., None]
  mean = (total * weights).sum(axis=-2) / jnp.maximum(weights.sum(axis=-2), 1.0)
  return mean.astype(x.dtype)


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
    scores = scores_lib.additive_scores(queries, keys, w, u, v, b)
    context, weights = _attend(self, scores, values, mask)
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
      scores = scores_lib.dot_scores(queries, keys)
    else:
      scores = scores_lib.general_scores(queries, keys, w)
    context, weights = _attend(self, scores, values, mask)
    return (context[:, 0], weights[:, 0]) if single else (context, weights)


class AttentionPooling(nn.Module):
  """Pools ``[batch, length, features]`` to ``[batch, features]`` with additive attention.

  The query is a learned vector in the score's hidden space, so the score is
  ``v^T tanh(q + U h_i)``: the attention-pooling classifier of Bahdanau-style
  sequence models.

  Attributes:
    units: width of the hidden layer inside the score.
    dtype: compute dtype of the scores and the pooled vector (None: the inputs').
  """
  units: int
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs, mask=None):
    """inputs ``[batch, length, features]``, mask bool ``[batch, length]``.

    Returns:
      pooled ``[batch, features]`` and weights ``[batch, length]``.
    """
    query = self.param("query", nn.initializers.zeros, (1, self.units))
    u = self.param("key_weight", nn.initializers.lecun_normal(),
                   (inputs.shape[-1], self.units))
    v = self.param("energy_weight", nn.initializers.normal(self.units ** -0.5),
                   (self.units,))
    inputs, query, u, v = nn.dtypes.promote_dtype(inputs, query, u, v, dtype=self.dtype)
    queries = jnp.broadcast_to(query, inputs.shape[:-2] + (1, self.units))
    scores = scores_lib.additive_scores(queries, inputs, None, u, v)
    context, weights = _attend(self, scores, inputs, mask)
    return context[..., 0, :], weights[..., 0, :]
