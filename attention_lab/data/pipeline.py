"""Batching that is a pure function of ``(seed, step)``, so resuming is exact.

The offline datasets are small, so a split lives in memory as numpy arrays and
the batch for step ``s`` is read from a per-epoch permutation seeded by
``(seed, epoch)``. A resumed run asks for step ``s`` and gets the same batch an
uninterrupted run would have: no iterator state needs saving.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

# feature -> [num_examples, ...]; a feature may itself be such a dict (a
# seq2seq model's inputs hold a source and a target).
Arrays = Dict[str, Any]


def _leaves(arrays: Arrays, prefix: str = ""):
  for k, v in arrays.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


def take(arrays: Arrays, index) -> Arrays:
  """``arrays`` with every leaf indexed by ``index`` (rows or a slice)."""
  return {k: take(v, index) if isinstance(v, dict) else v[index] for k, v in arrays.items()}


def num_examples(arrays: Arrays) -> int:
  lengths = {k: len(v) for k, v in _leaves(arrays)}
  sizes = set(lengths.values())
  if len(sizes) != 1:
    raise ValueError(f"features have different lengths: {lengths}")
  return sizes.pop()


class TrainBatches:
  """``batches(step)`` -> the training batch of that step.

  Args:
    arrays: the training split, feature -> ``[num_examples, ...]``.
    batch_size: examples per batch.
    seed: data-order seed.
    transform: optional ``fn(batch, rng) -> batch`` (augmentation), given a
      ``numpy.random.Generator`` seeded by ``(seed, step)``.
  """

  def __init__(self, arrays: Arrays, batch_size: int, seed: int,
               transform: Optional[Callable] = None):
    self.arrays = arrays
    self.size = num_examples(arrays)
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.batch_size = batch_size
    self.seed = seed
    self.transform = transform
    self._cached_epoch = None
    self._cached_order = None

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      self._cached_order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
      self._cached_epoch = epoch
    return self._cached_order

  def indices(self, step: int) -> np.ndarray:
    """Example indices of step ``step`` (batches may straddle two epochs)."""
    positions = step * self.batch_size + np.arange(self.batch_size)
    epochs, offsets = np.divmod(positions, self.size)
    out = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._order(int(epoch))[offsets[sel]]
    return out

  def __call__(self, step: int) -> Arrays:
    idx = self.indices(step)
    batch = take(self.arrays, idx)
    if self.transform is not None:
      batch = self.transform(batch, np.random.default_rng([self.seed, step, 1]))
    return batch


def eval_batches(arrays: Arrays, batch_size: int) -> Iterator[Arrays]:
  """Fixed-size batches over a whole split, each with a ``weight`` field.

  The last batch is padded with copies of example 0 at weight 0, so every
  example counts exactly once and the eval step compiles once.
  """
  size = num_examples(arrays)
  for start in range(0, size, batch_size):
    idx = np.arange(start, start + batch_size)
    weight = (idx < size).astype(np.float32)
    idx = np.where(idx < size, idx, 0)
    batch = take(arrays, idx)
    batch["weight"] = weight
    yield batch
