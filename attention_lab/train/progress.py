"""Progress lines (step, loss, steps/s, ETA), metric history and TensorBoard."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Steps/s and ETA over the steps run by this process.

  ``elapsed_before`` is the training time of earlier runs (from the
  checkpoint), so the total wall time survives a resume.
  """

  def __init__(self, total_steps: int, start_step: int, elapsed_before: float = 0.0):
    self.total_steps = total_steps
    self.elapsed_before = elapsed_before
    self._start_time = time.perf_counter()
    self._last_time = self._start_time
    self._last_step = start_step

  def elapsed(self) -> float:
    return self.elapsed_before + time.perf_counter() - self._start_time

  def line(self, step: int, metrics: Dict[str, float]) -> str:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    return (f"step {step}/{self.total_steps} | {shown} | {rate:.2f} steps/s | "
            f"ETA {format_duration(eta) if eta != float('inf') else '?'}")


class History:
  """Metric rows appended to ``WORKDIR/metrics.jsonl``; kept consistent on resume."""

  def __init__(self, path: str):
    self.path = path

  def truncate_after(self, step: int) -> None:
    """Drops rows logged after ``step`` (they belong to a run that died)."""
    rows = [r for r in self.read() if r["step"] <= step]
    with open(self.path, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")

  def append(self, split: str, step: int, metrics: Dict[str, float]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")

  def read(self) -> List[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


class Writer:
  """Logs, history and TensorBoard scalars in one call."""

  def __init__(self, workdir: str):
    from flax.metrics import tensorboard  # imports TensorFlow: only when training
    self.history = History(os.path.join(workdir, "metrics.jsonl"))
    self.tensorboard = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, split: str, step: int, metrics: Dict[str, float]) -> None:
    self.history.append(split, step, metrics)
    for k, v in metrics.items():
      self.tensorboard.scalar(f"{split}/{k}", v, step)

  def image(self, tag: str, step: int, image) -> None:
    self.tensorboard.image(tag, image, step)

  def flush(self) -> None:
    self.tensorboard.flush()

  def close(self) -> None:
    self.tensorboard.close()


class _NoHistory:
  def truncate_after(self, step: int) -> None:
    del step

  def append(self, split: str, step: int, metrics: Dict[str, float]) -> None:
    del split, step, metrics

  def read(self) -> List[dict]:
    return []


class NullWriter:
  """What processes other than the first use: they compute, they do not write."""

  history = _NoHistory()

  def scalars(self, split: str, step: int, metrics: Dict[str, float]) -> None:
    del split, step, metrics

  def image(self, tag: str, step: int, image) -> None:
    del tag, step, image

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass
