"""Counter-based attention dropout, shared by the fused kernels.

A fused kernel never holds the whole ``[q, kv]`` weight matrix, so it cannot
draw a dropout mask once and keep it for the backward. Instead each weight's
fate is a hash of two seeds and its coordinates (``dropout_keep``): the
forward and the backward regenerate the same mask block by block, on any
block shape, in plain integer ops that Triton, Mosaic and XLA all lower. The
Pallas kernel and ``blockwise`` use the same hash, so they drop the same
weights for the same key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _mix(x):
  """A 32-bit integer hash (lowbias32) in int32 arithmetic: wrapping
  products, logical shifts; the same bits as in uint32."""
  x = x ^ lax.shift_right_logical(x, jnp.int32(16))
  x = x * jnp.int32(np.uint32(0x7FEB352D).astype(np.int32))
  x = x ^ lax.shift_right_logical(x, jnp.int32(15))
  x = x * jnp.int32(np.uint32(0x846CA68B).astype(np.int32))
  return x ^ lax.shift_right_logical(x, jnp.int32(16))


_GOLDEN = np.uint32(0x9E3779B9).astype(np.int32)
_SILVER = np.uint32(0x85EBCA6B).astype(np.int32)


def dropout_keep(seed0, seed1, q_pos, k_pos, row, keep_prob):
  """Counter-based dropout: whether weight ``(q_pos, k_pos)`` is kept.

  A hash of the two int32 seeds, the positions and (unless the mask is
  broadcast over batch and heads) ``row = flat_batch * heads + head``, so the
  forward and both backward kernels regenerate the same mask block by block
  without storing it. ``keep = (h >> 8) < round(keep_prob * 2**24)`` with::

    h = mix(seed0 ^ (q_pos * 0x9E3779B9))
    h = mix(h ^ (k_pos * 0x85EBCA6B) ^ seed1)
    h = mix(h ^ row)                          # per (sequence, head) masks only

  in uint32 arithmetic, ``mix`` being lowbias32. Plain integer ops, so the
  same code runs in Triton, Mosaic and the interpreter.

  Args:
    seed0, seed1: int32 scalars (``dropout_seed``).
    q_pos, k_pos: int32 query and key positions, broadcastable to each other
      (in a kernel: ``[block_q, 1]`` and ``[1, block_k]``).
    row: int32 broadcastable to them (``flat_batch * heads + head``), or None
      for one mask shared by every sequence and head.
    keep_prob: Python float in (0, 1].

  Returns:
    bool of the broadcast shape of ``q_pos``, ``k_pos`` (and ``row``).
  """
  h = _mix(seed0 ^ (q_pos * jnp.int32(_GOLDEN)))
  h = _mix(h ^ (k_pos * jnp.int32(_SILVER)) ^ seed1)
  if row is not None:
    h = _mix(h ^ row)
  threshold = jnp.int32(round(keep_prob * (1 << 24)))
  return lax.shift_right_logical(h, jnp.int32(8)) < threshold


def dropout_seed(rng):
  """The two int32 seeds of ``dropout_keep`` from a JAX PRNG key."""
  return lax.bitcast_convert_type(jax.random.bits(rng, (2,), jnp.uint32), jnp.int32)
