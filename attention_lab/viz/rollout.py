"""Attention rollout (Abnar & Zuidema, 2020) and helpers, in numpy.

Shapes: per-layer weights ``[batch, heads, tokens, tokens]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def attention_rollout(layer_weights: Sequence[np.ndarray],
                      residual: float = 1.0) -> np.ndarray:
  """How much each input token flows into each output token through all layers.

  Each layer's heads are averaged, the residual connection is modelled by
  adding ``residual * identity``, rows are renormalised to sum to one, and the
  layers are multiplied from the first to the last.

  Args:
    layer_weights: list over layers of ``[batch, heads, tokens, tokens]``.
    residual: weight of the identity added for the skip connection.

  Returns:
    ``[batch, tokens, tokens]``; row ``i`` sums to one.
  """
  if not layer_weights:
    raise ValueError("attention_rollout needs at least one layer of weights")
  result = None
  for weights in layer_weights:
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
      raise ValueError(
          f"attention_rollout: expected [batch, heads, tokens, tokens], got {weights.shape}")
    mean = weights.mean(axis=1)
    mean = mean + residual * np.eye(mean.shape[-1])
    mean = mean / mean.sum(axis=-1, keepdims=True)
    result = mean if result is None else mean @ result
  return result


def tokens_to_grid(values: np.ndarray, height: int, width: int) -> np.ndarray:
  """``[patches]`` -> ``[grid_h, grid_w]`` for an image of ``height x width``."""
  n = values.shape[-1]
  grid_h = int(round(np.sqrt(n * height / width)))
  grid_w = n // grid_h
  if grid_h * grid_w != n:
    raise ValueError(f"{n} patch tokens do not tile a {height}x{width} image")
  return values.reshape(values.shape[:-1] + (grid_h, grid_w))


def upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest-neighbour upsampling of ``[grid_h, grid_w]`` to ``[height, width]``."""
  rows = np.arange(height) * grid.shape[0] // height
  cols = np.arange(width) * grid.shape[1] // width
  return grid[rows[:, None], cols[None, :]]
