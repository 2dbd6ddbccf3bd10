"""What the models sow into ``intermediates`` for pictures, collected in layer order.

Shape contracts of the sown ``attention_weights``, told apart by rank:

- ``[batch, heads, q_length, kv_length]`` (rank 4): multi-head self or cross
  attention (``layers.attention``); head grids and rollout draw these.
- ``[batch, queries, length]`` (rank 3): one query per step over a sequence,
  Bahdanau/Luong attention and attention pooling (``layers.recurrent_attention``,
  ``layers.pooling``); pooling has exactly one query.

``split_attention`` and ``pooled_weights`` check these contracts and name the
array and its shape when one is broken.
"""

from __future__ import annotations

import dataclasses
import re
from typing import List, Tuple

import numpy as np


def _natural_key(path):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def collect_sown(intermediates, name: str) -> List[Tuple[str, np.ndarray]]:
  """``(module path, array)`` of every value sown as ``name``, in layer order
  (``block_2`` before ``block_10``)."""
  import jax  # late: keeps this module importable for plotting alone
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if name in keys:
      module = "/".join(str(k) for k in keys[:keys.index(name)])
      found.append((module, np.asarray(leaf)))
  found.sort(key=lambda item: _natural_key(item[0]))
  return found


def collect_attention(intermediates) -> List[np.ndarray]:
  """Every sown ``attention_weights`` in layer order, of either rank (see the
  module docstring); ``split_attention`` separates them."""
  return [w for _, w in collect_sown(intermediates, "attention_weights")]


@dataclasses.dataclass(frozen=True)
class SownAttention:
  """The sown attention weights of one forward pass, by layout.

  Attributes:
    heads: per multi-head layer, ``[batch, heads, q_length, kv_length]``.
    pooling: per one-query-per-step layer, ``[batch, queries, length]``.
  """
  heads: List[np.ndarray]
  pooling: List[np.ndarray]


def split_attention(intermediates) -> SownAttention:
  """Sown ``attention_weights`` split into multi-head and pooling layouts.

  Raises:
    ValueError: a sown array of another rank, named by its module and shape.
  """
  heads, pooling = [], []
  for module, weights in collect_sown(intermediates, "attention_weights"):
    if weights.ndim == 4:
      heads.append(weights)
    elif weights.ndim == 3:
      pooling.append(weights)
    else:
      raise ValueError(
          f"attention_weights sown by {module or 'the model'} has shape {weights.shape}; "
          "expected [batch, heads, q, kv] (multi-head) or [batch, queries, length] (pooling)")
  return SownAttention(heads=heads, pooling=pooling)


def pooled_weights(weights: np.ndarray) -> np.ndarray:
  """Attention pooling's ``[batch, 1, length]`` weights as ``[batch, length]``.

  Raises:
    ValueError: when ``weights`` is not one query's weights.
  """
  if weights.ndim != 3 or weights.shape[1] != 1:
    raise ValueError(f"pooling weights have shape {weights.shape}; "
                     "expected [batch, 1, length] (one pooling query)")
  return weights[:, 0]


def leading_tokens(tokens: int, positions: int, what: str) -> int:
  """How many tokens (a CLS token: 1; none: 0) the attention has before the
  ``positions`` input positions it covers.

  Raises:
    ValueError: when ``tokens`` is neither ``positions`` nor ``positions + 1``.
  """
  extra = tokens - positions
  if extra not in (0, 1):
    raise ValueError(f"{what}: attention over {tokens} tokens does not match "
                     f"{positions} input positions (alone, or after one CLS token)")
  return extra


__all__ = ["SownAttention", "collect_attention", "collect_sown", "leading_tokens",
           "pooled_weights", "split_attention"]
