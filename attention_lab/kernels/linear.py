"""Linear attention (Katharopoulos et al. 2020): a kernel that is not softmax.

Softmax attention weighs key ``j`` for query ``i`` by ``exp(q_i . k_j)``.
Linear attention replaces the exponential with a product of feature maps,
``phi(q_i) . phi(k_j)`` with ``phi(x) = elu(x) + 1`` (positive, so weights
stay positive), which lets the sum over keys be taken once::

    out_i = phi(q_i) S / (phi(q_i) . z),   S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)

Cost and memory grow linearly with the length; with a causal mask ``S`` and
``z`` become running sums. Here causal attention walks the sequence in
chunks: within a chunk the masked products are taken directly, and the
chunks before it enter through their accumulated ``S`` and ``z`` (carried by
``lax.scan``), so nothing of size ``[length, length]`` exists.

This is a different function from softmax attention, so the registry
declares its semantics (``"linear_elu"``) and its own weights for pictures;
the suite checks it against its own float64 definition, not softmax.
Automatic dispatch never picks it: name it (``config.model.attention.kernel=linear``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attention_lab.kernels import checks
from attention_lab.kernels import masks
from attention_lab.kernels.reference import repeat_kv_heads

SEMANTICS = "linear_elu"
DEFAULT_CHUNK = 128


def feature_map(x):
  """``phi(x) = elu(x) + 1``, elementwise, in float32 at least."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jax.nn.elu(x) + 1.0


def _check(who, scale, bias, mask):
  if scale is not None:
    raise ValueError(f"{who}: linear attention has no logit scale (got scale={scale}); "
                     "its weights are phi(q) . phi(k), not exp(scale q . k)")
  checks.refuse_dense("linear", bias, mask)


def _features(query, key, value, kv_lengths, heads):
  """phi(q) ``[b, n, t, d]``, phi(k) ``[b, n, s, d]`` and v ``[b, n, s, dv]``
  (float32, batch dims flattened), padded keys zeroed so they add nothing."""
  batch = query.shape[:-3]
  flat = lambda x: jnp.swapaxes(x.reshape((-1,) + x.shape[len(batch):]), 1, 2)
  phi_q = flat(feature_map(query))
  phi_k = flat(feature_map(repeat_kv_heads(key, heads)))
  v = flat(repeat_kv_heads(value, heads).astype(phi_q.dtype))
  if kv_lengths is not None:
    valid = masks.padding_mask(jnp.reshape(kv_lengths, (-1,)), key.shape[-3])  # [b, s]
    phi_k = jnp.where(valid[:, None, :, None], phi_k, 0.0)
    v = jnp.where(valid[:, None, :, None], v, 0.0)
  return phi_q, phi_k, v


def _normalise(numerator, denominator):
  """``numerator / denominator`` with rows that saw no key set to zero."""
  has_key = denominator > 0
  return jnp.where(has_key[..., None],
                   numerator / jnp.where(has_key, denominator, 1.0)[..., None], 0.0)


def _full(phi_q, phi_k, v):
  state = jnp.einsum("bnsd,bnse->bnde", phi_k, v)                # [b, n, d, dv]
  z = phi_k.sum(axis=2)                                           # [b, n, d]
  return _normalise(jnp.einsum("bntd,bnde->bnte", phi_q, state),
                    jnp.einsum("bntd,bnd->bnt", phi_q, z))


def _causal(phi_q, phi_k, v, chunk: int):
  """Chunked causal linear attention: ``[b, n, t, dv]``."""
  b, n, t, d = phi_q.shape
  dv = v.shape[-1]
  chunk = min(chunk, t)
  padded = -(-t // chunk) * chunk
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, padded - t), (0, 0)])
  # [chunks, b, n, chunk, .]: the scan walks the first axis.
  split = lambda x: jnp.moveaxis(pad(x).reshape(b, n, padded // chunk, chunk, -1), 2, 0)
  within = jnp.tril(jnp.ones((chunk, chunk), bool))

  def step(carry, blocks):
    state, z = carry                                   # [b, n, d, dv], [b, n, d]
    q_c, k_c, v_c = blocks
    a = jnp.where(within, jnp.einsum("bnqd,bnkd->bnqk", q_c, k_c), 0.0)
    numerator = jnp.einsum("bnqd,bnde->bnqe", q_c, state) + jnp.einsum("bnqk,bnke->bnqe", a, v_c)
    denominator = jnp.einsum("bnqd,bnd->bnq", q_c, z) + a.sum(-1)
    carry = (state + jnp.einsum("bnkd,bnke->bnde", k_c, v_c), z + k_c.sum(axis=2))
    return carry, _normalise(numerator, denominator)

  init = (jnp.zeros((b, n, d, dv), phi_q.dtype), jnp.zeros((b, n, d), phi_q.dtype))
  _, outs = lax.scan(step, init, (split(phi_q), split(phi_k), split(v)))
  out = jnp.moveaxis(outs, 0, 2).reshape(b, n, padded, dv)
  return out[:, :, :t]


def linear_attention(query, key, value, bias=None, mask=None, *,
                     scale: Optional[float] = None, is_causal: bool = False,
                     kv_lengths=None, chunk: int = DEFAULT_CHUNK):
  """ELU+1 linear attention; the kernel contract's shapes.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``.
    value: ``[batch..., kv_length, kv_heads, value_dim]``.
    bias / mask: not supported (ValueError): linear attention never forms
      the score matrix they would apply to; padding goes in ``kv_lengths``.
    scale: must be None (there is no logit scale).
    is_causal: query ``i`` sees keys ``j <= i`` (start-aligned).
    kv_lengths: int ``[batch...]``, valid prefix of the keys.
    chunk: queries per chunk of the causal scan.

  Returns:
    ``[batch..., q_length, heads, value_dim]`` in the query dtype; a query
    with no visible key gets zeros.
  """
  _check("linear_attention", scale, bias, mask)
  shape = checks.check_inputs(query, key, value, who="linear_attention")
  checks.check_lengths("linear_attention", "kv_lengths", kv_lengths, shape.batch)
  if chunk <= 0:
    raise ValueError(f"linear_attention: chunk must be positive, got {chunk}")
  if is_causal and shape.q_length != shape.kv_length:
    raise ValueError(f"linear_attention: causal needs q_length == kv_length, got "
                     f"{shape.q_length} and {shape.kv_length}")
  phi_q, phi_k, v = _features(query, key, value, kv_lengths, shape.heads)
  out = _causal(phi_q, phi_k, v, chunk) if is_causal else _full(phi_q, phi_k, v)
  out = jnp.swapaxes(out, 1, 2)                                    # [b, t, n, dv]
  return out.reshape(shape.batch + out.shape[1:]).astype(query.dtype)


def linear_attention_weights(query, key, bias=None, mask=None, *, scale=None,
                             is_causal: bool = False, local_window_size=None, **unused):
  """The weights linear attention gives, ``[batch..., heads, q_length, kv_length]``:
  ``phi(q_i) . phi(k_j)`` over the visible keys, normalised per query (what
  pictures show; quadratic, so for drawing only). ``query``
  ``[batch..., q_length, heads, head_dim]``, ``key``
  ``[batch..., kv_length, kv_heads, head_dim]``; ``mask`` (e.g. padding, bool
  broadcastable to the weights) hides keys; rows with no visible key are zero."""
  del unused
  if scale is not None or bias is not None or local_window_size is not None:
    raise ValueError("linear_attention_weights: no scale, bias or window in linear attention")
  # The key stands in for the value: the weights need none, the checks one.
  checks.check_inputs(query, key, key, mask, None, who="linear_attention_weights")
  heads = query.shape[-2]
  scores = jnp.einsum("...qnd,...knd->...nqk", feature_map(query),
                      feature_map(repeat_kv_heads(key, heads)))
  visible = jnp.ones(scores.shape[-2:], bool)
  if is_causal:
    visible = jnp.tril(visible)
  if mask is not None:
    visible = visible & jnp.asarray(mask, bool)
  scores = jnp.where(visible, scores, 0.0)
  total = scores.sum(-1, keepdims=True)
  return jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), 0.0)
