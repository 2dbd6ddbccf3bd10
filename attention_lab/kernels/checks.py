"""Input validation shared by every kernel: wrong shapes fail loudly, by name.

Layout: ``query [batch..., q_length, heads, head_dim]``,
``key [batch..., kv_length, kv_heads, head_dim]``,
``value [batch..., kv_length, kv_heads, value_dim]``; ``heads`` must be a
multiple of ``kv_heads`` (grouped-query attention when they differ).
Masks and biases broadcast to ``[batch..., heads, q_length, kv_length]``.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax.numpy as jnp
import numpy as np


class AttentionShape(NamedTuple):
  batch: Tuple[int, ...]
  q_length: int
  kv_length: int
  heads: int
  kv_heads: int
  head_dim: int
  value_dim: int

  @property
  def scores(self) -> Tuple[int, ...]:
    """Shape of the score matrix ``[batch..., heads, q_length, kv_length]``."""
    return self.batch + (self.heads, self.q_length, self.kv_length)


def check_inputs(query, key, value, mask=None, bias=None,
                 who: str = "attention") -> AttentionShape:
  """Validates the kernel contract and returns the named sizes.

  Raises:
    ValueError: naming the offending arrays and their shapes.
  """
  def fail(msg):
    raise ValueError(
        f"{who}: {msg} (query {tuple(query.shape)}, key {tuple(key.shape)}, "
        f"value {tuple(value.shape)}; expected [batch..., length, heads, head_dim])")

  if not (query.ndim == key.ndim == value.ndim):
    fail("query, key and value must have the same rank")
  if query.ndim < 3:
    fail("arrays need at least 3 dims [length, heads, head_dim]")
  if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
    fail("batch dimensions differ")
  if key.shape[-3] != value.shape[-3]:
    fail("key and value lengths differ")
  if key.shape[-2] != value.shape[-2]:
    fail("key and value head counts differ")
  if query.shape[-1] != key.shape[-1]:
    fail("query and key head_dim differ")
  heads, kv_heads = query.shape[-2], key.shape[-2]
  if kv_heads == 0 or heads % kv_heads:
    fail(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      fail(f"{name} must be floating point, got {x.dtype}")

  shape = AttentionShape(
      batch=tuple(query.shape[:-3]), q_length=query.shape[-3],
      kv_length=key.shape[-3], heads=heads, kv_heads=kv_heads,
      head_dim=query.shape[-1], value_dim=value.shape[-1])

  if mask is not None:
    if jnp.asarray(mask).dtype != jnp.bool_:
      raise ValueError(
          f"{who}: mask must be boolean (True = attend), got dtype "
          f"{jnp.asarray(mask).dtype}; convert 0/1 masks with as_bool_mask and "
          "pass additive float terms as `bias`")
    _check_broadcast(who, "mask", mask.shape, shape.scores)
  if bias is not None:
    _check_broadcast(who, "bias", bias.shape, shape.scores)
  return shape


def as_bool_mask(mask):
  """Flax's ``make_attention_mask`` returns float 0/1; nonzero means attend."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _check_broadcast(who, name, got, target):
  ok = len(got) <= len(target)
  if ok:
    try:
      ok = np.broadcast_shapes(tuple(got), tuple(target)) == tuple(target)
    except ValueError:
      ok = False
  if not ok:
    raise ValueError(
        f"{who}: {name} shape {tuple(got)} does not broadcast to the score "
        f"shape {tuple(target)} = [batch..., heads, q_length, kv_length]")


def refuse_dense(kernel: str, bias=None, mask=None) -> None:
  """For kernels that take padding as lengths only: a dense bias or mask is
  a ValueError naming the kernel."""
  if bias is not None or mask is not None:
    raise ValueError(f"attention kernel {kernel!r} does not support "
                     f"{'bias' if bias is not None else 'mask'}; pass kv_lengths for padding")


def check_lengths(who: str, name: str, lengths, batch: Tuple[int, ...]) -> None:
  """``lengths`` (None, or int ``[batch...]``) must have the batch shape."""
  if lengths is not None and tuple(jnp.shape(lengths)) != batch:
    raise ValueError(f"{who}: {name} shape {tuple(jnp.shape(lengths))} must equal "
                     f"the batch shape {batch}")


def kv_lengths_vector(who: str, kv_lengths, shape: AttentionShape):
  """Key lengths as int32 ``[prod(batch)]`` within ``[0, kv_length]``; all
  keys valid when ``kv_lengths`` is None."""
  flat = int(np.prod(shape.batch)) if shape.batch else 1
  if kv_lengths is None:
    return jnp.full((flat,), shape.kv_length, jnp.int32)
  check_lengths(who, "kv_lengths", kv_lengths, shape.batch)
  return jnp.clip(jnp.asarray(kv_lengths, jnp.int32).reshape(flat), 0, shape.kv_length)


def collapse_batch(x, batch: Tuple[int, ...]):
  """A mask or bias broadcastable to ``[batch..., heads, q, kv]`` as 4-D
  ``[1 or prod(batch), heads | 1, q | 1, kv | 1]``, the layout the fused kernels
  slice per block: size-one dims stay size one (nothing is materialised that
  the caller did not pass), and the batch dims collapse to one, or to 1 when
  the array is shared by every sequence."""
  x = jnp.asarray(x)
  x = x.reshape((1,) * (len(batch) + 3 - x.ndim) + x.shape)
  lead, tail = x.shape[:len(batch)], x.shape[len(batch):]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + tail)
  return jnp.broadcast_to(x, batch + tail).reshape((-1,) + tail)
