"""Attention masks: one convention everywhere.

A mask is a boolean array where ``True`` means *attend* (the convention of
``jax.nn.dot_product_attention`` and Flax). Masks broadcast against the score
matrix ``[batch..., heads, q_length, kv_length]``; the helpers below return the
smallest shape that does, so they can be combined with ``combine_masks``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax.numpy as jnp

Window = Union[int, Tuple[int, int]]


def padding_mask(lengths, max_length: int):
  """Valid-position mask from sequence lengths.

  Args:
    lengths: int array ``[batch...]``, number of valid (leading) positions.
    max_length: the padded length.

  Returns:
    bool ``[batch..., max_length]``; ``True`` at positions ``< lengths``.
  """
  lengths = jnp.asarray(lengths)
  return jnp.arange(max_length) < lengths[..., None]


def attention_mask(query_valid, key_valid=None):
  """Pairwise mask from per-position validity.

  Args:
    query_valid: bool ``[batch..., q_length]``.
    key_valid: bool ``[batch..., kv_length]``; defaults to ``query_valid``
      (self-attention).

  Returns:
    bool ``[batch..., 1, q_length, kv_length]`` (the 1 broadcasts over heads).
  """
  if key_valid is None:
    key_valid = query_valid
  query_valid = jnp.asarray(query_valid, bool)
  key_valid = jnp.asarray(key_valid, bool)
  return (query_valid[..., None, :, None] & key_valid[..., None, None, :])


def key_padding_mask(key_lengths, kv_length: int):
  """Mask that hides padded keys only (every query row stays valid).

  Args:
    key_lengths: int ``[batch...]``.
    kv_length: the padded key length.

  Returns:
    bool ``[batch..., 1, 1, kv_length]``.
  """
  return padding_mask(key_lengths, kv_length)[..., None, None, :]


def causal_mask(q_length: int, kv_length: Optional[int] = None):
  """Lower-triangular mask: query ``i`` sees keys ``j <= i``.

  Positions are counted from the start of both sequences, as in
  ``jax.nn.dot_product_attention(is_causal=True)`` and Flax's
  ``make_causal_mask``; decoding against a longer cache passes an explicit mask.

  Returns:
    bool ``[q_length, kv_length]``.
  """
  kv_length = q_length if kv_length is None else kv_length
  q = jnp.arange(q_length)[:, None]
  k = jnp.arange(kv_length)[None, :]
  return k <= q


def _window_sides(window: Window) -> Tuple[int, int]:
  if isinstance(window, int):
    left, right = window, window
  else:
    left, right = window
  if left < 0 or right < 0:
    raise ValueError(f"window sizes must be >= 0, got {window!r}")
  return int(left), int(right)


def sliding_window_mask(q_length: int, kv_length: Optional[int] = None,
                        window: Window = 0):
  """Local band: query ``i`` sees keys ``i - left <= j <= i + right``.

  Args:
    window: ``w`` for a symmetric band or ``(left, right)``; the same meaning
      as ``local_window_size`` in ``jax.nn.dot_product_attention``. Combine with
      ``causal_mask`` (or pass ``is_causal``) for a causal sliding window.

  Returns:
    bool ``[q_length, kv_length]``.
  """
  kv_length = q_length if kv_length is None else kv_length
  left, right = _window_sides(window)
  q = jnp.arange(q_length)[:, None]
  k = jnp.arange(kv_length)[None, :]
  return (k >= q - left) & (k <= q + right)


def combine_masks(*masks):
  """Logical AND of masks, skipping ``None``; ``None`` if all are ``None``."""
  masks = [jnp.asarray(m, bool) for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out
