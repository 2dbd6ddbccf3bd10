"""Stopping cleanly on SIGTERM: the signal schedulers send before preempting.

Colab, TPU pods and SLURM send SIGTERM some seconds before they kill a job.
The handler only sets a flag; the loop checks it after each step, saves a
checkpoint and returns, so a rerun of the same command resumes exactly.
(SIGKILL cannot be caught: there the atomic checkpoint saves are the
protection, and the run resumes from the newest complete one.)
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class Listener:
  """Context manager that turns SIGTERM into a flag for the training loop.

  The previous handler is restored on exit. Off the main thread (where Python
  cannot install handlers) it listens to nothing.
  """

  name = "SIGTERM"

  def __init__(self, signum: int = signal.SIGTERM):
    self.signum = signum
    self.flag = False
    self._previous = None

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(self.signum, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(self.signum, self._previous)
    return False

  def received(self, step: int, every: int) -> bool:
    """Whether to stop after ``step``.

    One process checks its own flag every step. Several processes must stop at
    the same step (a checkpoint save is collective), so they agree every
    ``every`` steps: if any of them was signalled, all stop there.
    """
    if jax.process_count() == 1:
      return self.flag
    if step % every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.flag))
    return bool(np.any(flags))
