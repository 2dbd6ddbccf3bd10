"""Checkpoints with orbax: the train state plus a small JSON record.

The JSON record holds what the loop needs to continue exactly (the wall time
spent so far, for ETA and results) and the config the run was started with.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import flax.serialization
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


class Checkpoints:
  """Saves and restores ``(train_state, record)`` under ``directory``.

  Args:
    directory: where step folders go (created if absent).
    keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        # Saves are waited for anyway (the loop needs them on disk before it
        # goes on), so no background thread is kept writing.
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, record: Dict[str, Any]) -> None:
    """Saves step ``step``; returns once the save is complete on disk."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        record=ocp.args.JsonSave(record)), force=True)
    self.manager.wait_until_finished()

  def restore(self, template, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
    """Restores ``step`` (default: latest) into the structure of ``template``.

    Raises:
      CheckpointError: naming the checkpoint, when it cannot be read or does
        not fit ``template`` (e.g. the model changed shape since it was saved).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    target = flax.serialization.to_state_dict(template)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          record=ocp.args.JsonRestore()))
      _check_shapes(target, restored["state"])
      state = flax.serialization.from_state_dict(template, restored["state"])
    except Exception as e:  # orbax raises many types; name the file instead
      raise CheckpointError(
          f"cannot restore checkpoint step {step} from {self.directory}: "
          f"{type(e).__name__}: {e}") from e
    return state, dict(restored["record"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_shapes(expected, got) -> None:
  """Orbax restores what was saved; a changed model must fail here, loudly."""
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  have = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, leaf in want:
    name = jax.tree_util.keystr(path)
    if path not in have:
      raise ValueError(f"checkpoint lacks {name}")
    if tuple(getattr(have[path], "shape", ())) != tuple(getattr(leaf, "shape", ())):
      raise ValueError(
          f"{name} has shape {tuple(have[path].shape)} in the checkpoint but "
          f"{tuple(leaf.shape)} in the model (did the config change?)")
