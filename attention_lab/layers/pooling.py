"""Pooling a sequence ``[batch, length, features]`` to one vector
``[batch, features]``: attention pooling (a learned query with Bahdanau's
additive score) and the masked mean.

Mixed precision as in ``recurrent_attention``: the softmax and the mean's sum
run in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from attention_lab.layers.recurrent_attention import additive_scores
from attention_lab.layers.recurrent_attention import attend


def masked_mean(x, valid):
  """Mean of ``x [batch, length, features]`` over the positions where
  ``valid [batch, length]`` is True; zeros for a row with none. Summed in
  float32 (a bfloat16 sum of thousands of positions loses digits), returned in
  ``x``'s dtype."""
  total = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  weights = valid.astype(total.dtype)[..., None]
  mean = (total * weights).sum(axis=-2) / jnp.maximum(weights.sum(axis=-2), 1.0)
  return mean.astype(x.dtype)


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
    scores = additive_scores(queries, inputs, None, u, v)
    context, weights = attend(self, scores, inputs, mask)
    return context[..., 0, :], weights[..., 0, :]
