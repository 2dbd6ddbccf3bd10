"""Batching that is a pure function of ``(seed, step)``, so resuming is exact.

The offline datasets are small, so a split lives in memory as numpy arrays and
the batch for step ``s`` is read from a per-epoch permutation seeded by
``(seed, epoch)``. A resumed run asks for step ``s`` and gets the same batch an
uninterrupted run would have: no iterator state needs saving.

``Prefetcher`` builds the next batches on a background thread while the
device runs the current step; it only calls ``batches(step)`` ahead of time,
so the batch of each step stays that pure function.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
from absl import logging

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
    # (epoch, permutation), replaced as one object: a prefetch thread and the
    # main thread may both ask for batches, and neither must see one epoch's
    # number beside another epoch's order.
    self._cached = (None, None)

  def _order(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._cached
    if epoch != cached_epoch:
      order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
      self._cached = (epoch, order)
    return order

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


class _Failure:
  """What the producer thread hands over instead of the batch it could not build."""

  def __init__(self, step: int, error: BaseException):
    self.step = step
    self.error = error


class Prefetcher:
  """``get(step)`` -> ``batches(step)``, built up to ``depth`` steps ahead on a
  background thread, for the steps ``start, start + 1, ..., stop - 1`` in order.

  Only the moment each batch is built changes: ``get(step)`` returns exactly
  ``batches(step)``, so a run resumed at ``start`` sees the batches an
  uninterrupted one did. An exception raised while building a batch is raised
  again, the same object with its message, by the ``get`` of that step. Use it
  as a context manager: leaving the block for any reason (the end, an error,
  KeyboardInterrupt) stops the thread and waits for it.

  Args:
    batches: ``fn(step) -> batch``, a pure function of the step.
    start, stop: the steps to serve, ``range(start, stop)``.
    depth: batches built ahead (the queue's bound); 0 builds each batch in
      ``get``, on the caller's thread, with no thread at all.
  """

  THREAD_NAME = "attention_lab-prefetch"

  def __init__(self, batches: Callable[[int], Arrays], start: int, stop: int, depth: int):
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._batches = batches
    self._next = start
    self._stop = stop
    self.depth = depth
    self._queue: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
    self._closing = threading.Event()
    self._thread = None
    if depth and start < stop:
      self._thread = threading.Thread(target=self._produce, args=(start, stop),
                                      name=self.THREAD_NAME, daemon=True)
      self._thread.start()

  def _produce(self, start: int, stop: int) -> None:
    step = start
    try:
      for step in range(start, stop):
        if self._closing.is_set():
          return
        if not self._put((step, self._batches(step))):
          return
    except BaseException as e:  # anything: the consumer re-raises it
      self._put(_Failure(step, e))

  def _put(self, item) -> bool:
    """Waits for room in the queue; False once ``close`` was called."""
    while not self._closing.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def get(self, step: int) -> Arrays:
    """The batch of ``step``, which must be the next step of the range."""
    if step != self._next or step >= self._stop:
      raise ValueError(f"prefetcher asked for step {step}; it serves step "
                       f"{self._next} next, up to {self._stop - 1}")
    self._next += 1
    if self._thread is None:
      return self._batches(step)
    while True:
      try:
        item = self._queue.get(timeout=0.5)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError(f"the prefetch thread ended without the batch of step {step}"
                             ) from None
    if isinstance(item, _Failure):
      self._thread.join()
      item.error.add_note(f"(raised building the batch of step {item.step} "
                          "on the prefetch thread)")
      raise item.error
    got, batch = item
    if got != step:      # a bug here would silently change the run: never serve it
      raise RuntimeError(f"prefetch thread built step {got} for step {step}")
    return batch

  def close(self, timeout: float = 60.0) -> None:
    """Stops the thread (a batch being built is finished first) and waits for it."""
    if self._thread is None:
      return
    self._closing.set()
    while True:          # frees a producer waiting for room
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)
    if self._thread.is_alive():
      raise RuntimeError(f"the prefetch thread did not stop within {timeout:g} s "
                         "(a batch function that never returns?)")
    self._thread = None

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, exc_type, exc, traceback) -> bool:
    try:
      self.close()
    except RuntimeError as e:
      if exc_type is None:
        raise
      logging.warning("%s", e)         # never hide the error that ended the loop
    return False


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
