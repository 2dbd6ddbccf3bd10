"""``jax.nn.dot_product_attention`` behind the kernel contract.

It adds what the contract asks beyond ``jax.nn``: any number of batch
dimensions, and zeros (not the mean of the values) for a query whose keys are
all masked. On GPU, ``jax_implementation="cudnn"`` selects cuDNN's fused
kernel; on CPU XLA runs the materialised formulation.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

from attention_lab.kernels import checks
from attention_lab.kernels import masks
from attention_lab.kernels.reference import attention_logits
from attention_lab.kernels.reference import full_mask
from attention_lab.kernels.softmax import masked_logsumexp


def cudnn_window_problem(window, is_causal) -> Optional[str]:
  """Why jax.nn's cuDNN path cannot take ``window`` (``(left, right)``), or
  None: it takes a window's left side only, and a right side just beside a
  plain causal mask. Causal hides every key to the right anyway, so the
  cudnn kernel drops the right side there (``_cudnn_window``)."""
  if window is not None and window[1] > 0 and not is_causal:
    return f"no window looking right without causal ({window[1]} keys)"
  return None


def _cudnn_window(window, is_causal):
  """``(window, implementation)`` for jax.nn's cuDNN path: the right side
  dropped where causal hides it; a window cuDNN cannot take
  (``cudnn_window_problem``) goes to jax.nn's XLA formulation instead
  (named in the log once)."""
  left, right = masks._window_sides(window)
  if cudnn_window_problem((left, right), is_causal) is None:
    return (left, 0), "cudnn"
  if (left, right) not in _LOGGED_WINDOWS:
    _LOGGED_WINDOWS.add((left, right))
    logging.info("cudnn: a window with %d keys to the right (not causal) is not in cuDNN's "
                 "fused attention; jax.nn's XLA formulation runs it", right)
  return (left, right), None


_LOGGED_WINDOWS = set()


def jax_nn_attention(query, key, value, bias=None, mask=None, *,
                     scale: Optional[float] = None, is_causal: bool = False,
                     local_window_size=None, return_residual: bool = False,
                     jax_implementation: Optional[str] = None):
  """Same arguments and shapes as ``reference_attention`` (no dropout):
  query ``[batch..., q_length, heads, head_dim]``, key / value
  ``[batch..., kv_length, kv_heads, head_dim / value_dim]``, mask and bias
  broadcastable to ``[batch..., heads, q_length, kv_length]``; returns
  ``[batch..., q_length, heads, value_dim]``.

  ``return_residual``: also the float32 log-sum-exp ``[batch..., q, heads]``
  (``-inf`` for a query with no key), with gradients.
  ``jax_implementation``: ``jax.nn.dot_product_attention``'s own
  ``implementation`` (``"xla"``, ``"cudnn"`` or None for its choice).
  """
  shape = checks.check_inputs(query, key, value, mask, bias,
                              who="jax_nn_attention")
  if bias is not None:
    # jax.nn turns a row whose bias is -inf everywhere into NaN (forward and
    # gradient). A -inf bias hides a key, which is what the mask says: move
    # it there, keep the bias finite.
    hidden = jnp.isneginf(bias)
    mask = ~hidden if mask is None else mask & ~hidden
    bias = jnp.where(hidden, jnp.zeros((), bias.dtype), bias)
  if jax_implementation == "cudnn" and local_window_size is not None:
    local_window_size, jax_implementation = _cudnn_window(local_window_size, is_causal)
  batch = shape.batch
  flat = math.prod(batch) if batch else 1

  def flatten(x):
    return x.reshape((flat,) + x.shape[len(batch):])

  def flatten_scores(x):
    if x is None:
      return None
    x = jnp.broadcast_to(x, batch + tuple(x.shape[-3:]) if x.ndim >= 3
                         else batch + (1,) * (3 - x.ndim) + tuple(x.shape))
    return x.reshape((flat,) + x.shape[len(batch):])

  # jax.nn wants value_dim == head_dim; zero-padding the narrower side leaves
  # the scores (scale fixed from the true head_dim) and the output unchanged.
  width = max(shape.head_dim, shape.value_dim)
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  scale = shape.head_dim ** -0.5 if scale is None else scale
  attend = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, bias=flatten_scores(bias), mask=flatten_scores(mask), scale=scale,
      is_causal=is_causal, local_window_size=local_window_size,
      implementation=jax_implementation)
  args = (flatten(pad(query)), flatten(pad(key)), flatten(pad(value)))
  if query.dtype == jnp.float16 and jax_implementation is None:
    # jax.nn asks for the F16_F16_F32 dot algorithm, which XLA:CPU cannot
    # compile (the backward pass fails): on CPU run it in float32 instead.
    on_cpu = lambda q, k, v: attend(*(x.astype(jnp.float32) for x in (q, k, v))).astype(q.dtype)
    out = jax.lax.platform_dependent(*args, cpu=on_cpu, default=attend)
  else:
    out = attend(*args)
  out = out.reshape(batch + out.shape[1:])[..., :shape.value_dim]
  lse = None
  if return_residual:
    # jax.nn's own residual is stop_gradient'ed and in the input dtype; the
    # contract's is float32 and differentiable, so it is computed here (the
    # XLA formulation materialises the scores anyway).
    logits = attention_logits(query, key, bias, scale=scale)
    lse = masked_logsumexp(logits, full_mask(shape, mask, is_causal, local_window_size))
    lse = jnp.swapaxes(lse, -1, -2).astype(jnp.float32)        # [batch..., q, heads]

  # jax.nn gives a fully masked row the mean of the values; the contract
  # says zeros. Only a mask (the user's, or a -inf bias) or a window can
  # empty a row.
  if mask is not None or local_window_size is not None:
    combined = full_mask(shape, mask, is_causal, local_window_size)
    combined = jnp.broadcast_to(combined, shape.scores)
    row_has_key = jnp.any(combined, axis=-1)            # [batch..., heads, q]
    row_has_key = jnp.swapaxes(row_has_key, -1, -2)     # [batch..., q, heads]
    out = jnp.where(row_has_key[..., None], out, jnp.zeros((), out.dtype))
  return out if lse is None else (out, lse)
