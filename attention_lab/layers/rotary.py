"""Rotary position embeddings (RoFormer, Su et al. 2021), 1-D and 2-D.

Queries and keys are rotated, pair of features by pair of features, by an
angle proportional to their position, so the score ``q_i . k_j`` depends on
the positions only through ``i - j``: relative positions without a bias
matrix, so every fused kernel runs unchanged.

Pairs are the two halves of the head dimension (feature ``m`` with feature
``m + d/2``), as GPT-NeoX and most JAX code lay them out; pair ``m`` turns
at frequency ``base ** (-2m / d)``. The 2-D form (for image patches) gives
half the pairs the row and half the column.
"""

from __future__ import annotations

import jax.numpy as jnp


def rotary_angles(positions, dim: int, base: float = 10000.0):
  """``positions [...]`` (int or float) -> angles ``[..., dim // 2]`` (float32)."""
  if dim % 2:
    raise ValueError(f"rotary embeddings need an even head dimension, got {dim}")
  frequencies = base ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)
  return jnp.asarray(positions, jnp.float32)[..., None] * frequencies


def rotate(x, angles):
  """Rotates feature pairs ``(x[m], x[m + d/2])`` of ``x [..., d]`` by
  ``angles [..., d/2]`` (broadcast); the result has ``x``'s dtype."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def apply_rotary(x, positions, base: float = 10000.0):
  """1-D rotary embedding of ``x [batch..., length, heads, head_dim]`` at
  ``positions`` (int ``[length]`` or ``[batch..., length]``)."""
  angles = rotary_angles(positions, x.shape[-1], base)            # [..., length, d/2]
  return rotate(x, angles[..., None, :])                          # shared by the heads


def apply_rotary_2d(x, positions, base: float = 10000.0):
  """2-D rotary embedding: ``positions [..., length, 2]`` (row, column); the
  first half of the head dimension turns with the row, the second with the
  column. ``head_dim`` must be a multiple of 4."""
  d = x.shape[-1]
  if d % 4:
    raise ValueError(f"2-D rotary embeddings need a head dimension divisible by 4, got {d}")
  positions = jnp.asarray(positions)
  if positions.shape[-1] != 2:
    raise ValueError(f"2-D rotary embeddings need positions [..., length, 2] (row, column), "
                     f"got shape {positions.shape}")
  rows = apply_rotary(x[..., :d // 2], positions[..., 0], base)
  cols = apply_rotary(x[..., d // 2:], positions[..., 1], base)
  return jnp.concatenate([rows, cols], -1)


def grid_positions(height: int, width: int, leading: int = 0):
  """Row-major patch positions ``[leading + height * width, 2]`` (int32);
  ``leading`` extra tokens (a CLS token) sit at ``(0, 0)`` before the grid,
  with the grid shifted to start at ``(1, 1)`` so no patch shares their angle."""
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  grid = jnp.stack([rows.reshape(-1), cols.reshape(-1)], -1) + (1 if leading else 0)
  return jnp.concatenate([jnp.zeros((leading, 2), grid.dtype), grid]).astype(jnp.int32)
