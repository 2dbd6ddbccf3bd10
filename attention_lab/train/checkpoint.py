"""Checkpoints with orbax: the train state plus a small JSON record.

The JSON record holds what the loop needs to continue exactly (the wall time
spent so far, for ETA and results) and the config the run was started with.

A save is atomic (orbax writes a temporary folder and renames it when
complete), so a run killed mid-save leaves the previous checkpoints intact.
With ``async_save`` the arrays are copied to host memory before ``save``
returns and written by a background thread while training goes on; the
rename still comes last, so a run killed while that thread writes leaves only
a temporary folder, which the next run removes. ``wait`` (and ``close``)
return once every save is renamed into place.
``restore_newest_readable`` goes further for checkpoints damaged afterwards
(a truncated file, lost metadata): it moves an unreadable step aside into
``UNREADABLE_DIR`` (never deleting it) and falls back to the next newest.
A checkpoint that reads fine but does not fit the model is a config change,
not damage: that stops the run and touches nothing.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import flax.serialization
import jax
import orbax.checkpoint as ocp
from absl import logging

# Sibling of the checkpoint directory that receives unreadable steps.
UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored."""


class CheckpointMismatch(CheckpointError):
  """A checkpoint was read but does not fit the model (the config changed)."""


class Checkpoints:
  """Saves and restores ``(train_state, record)`` under ``directory``.

  Args:
    directory: where step folders go (created if absent).
    keep: how many of the newest checkpoints to keep.
    async_save: write in a background thread (``save`` returns once the
      arrays are on the host); otherwise ``save`` returns once on disk.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    self._pending: Optional[int] = None      # the step a background save is writing
    self.manager = ocp.CheckpointManager(
        self.directory,
        # Named handlers let a fresh process read a step's metadata before
        # restoring it (to tell a damaged checkpoint from a changed config).
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "record": ocp.JsonCheckpointHandler()},
        # Temporary folders left by a process killed mid-save are removed
        # when the next run opens the directory.
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, record: Dict[str, Any]) -> None:
    """Saves step ``step``; returns once the save is complete on disk, or with
    ``async_save`` once ``state`` is copied to the host (``state`` may then
    change, or be donated, while the write goes on).

    Raises:
      CheckpointError: the disk refused the write (full, read-only...) of this
        step or, with ``async_save``, of the previous one still being written;
        the half-written step stays a temporary folder and earlier steps are
        kept.
    """
    self.wait()            # the previous background save, with its own step number
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
          record=ocp.args.JsonSave(record)), force=True)
    except Exception as e:  # OSError, or storage errors (TensorStore) wrapping one
      raise _write_error(step, self.directory, e) from e
    self._pending = step
    if not self.async_save:
      self.wait()

  def wait(self) -> None:
    """Returns once every save started is complete (renamed into place) on disk.

    Raises:
      CheckpointError: a background write failed (naming its step).
    """
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise _write_error(step, self.directory, e) from e

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
    where = f"checkpoint step {step} in {self.directory}"
    try:
      metadata = self.manager.item_metadata(step)["state"]
      saved = getattr(metadata, "tree", metadata)
      if saved is None:
        raise FileNotFoundError("no metadata for the state")
    except Exception as e:  # orbax raises many types; name the file instead
      raise CheckpointError(f"cannot read the metadata of {where}: "
                            f"{type(e).__name__}: {e}") from e
    try:
      _check_shapes(target, saved)
    except ValueError as e:
      raise CheckpointMismatch(f"{where} does not fit this model: {e}") from e
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          record=ocp.args.JsonRestore()))
      _check_shapes(target, restored["state"])
      state = flax.serialization.from_state_dict(template, restored["state"])
      record = dict(restored["record"])
    except Exception as e:
      raise CheckpointError(f"cannot restore {where}: {type(e).__name__}: {e}") from e
    return state, record

  def restore_newest_readable(self, template, set_aside: bool = True
                              ) -> Tuple[Any, Dict[str, Any]]:
    """Restores the newest step that reads, warning about newer ones that do not.

    Unreadable steps newer than it are moved (never deleted) to
    ``UNREADABLE_DIR`` beside the checkpoint directory when ``set_aside``
    (training: so the run can save those steps again), by the first process
    only. Nothing is moved unless an older step did read, so a fault that
    hits every step alike (permissions, a storage outage) moves nothing.

    Raises:
      CheckpointMismatch: a step reads but does not fit ``template``
        (nothing is moved: the checkpoints are fine, the config changed).
      CheckpointError: no step is readable (nothing is moved).
    """
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.restore(template, step)
      except CheckpointMismatch:
        raise
      except CheckpointError as e:
        logging.warning("%s", e)
        unreadable.append((step, e))
        continue
      for bad, _ in unreadable:
        if set_aside and jax.process_index() == 0:
          logging.warning("moved unreadable checkpoint step %d to %s; resuming from step %d",
                          bad, self._set_aside(bad), step)
        else:
          logging.warning("skipping unreadable checkpoint step %d; using step %d", bad, step)
      return restored
    raise CheckpointError(
        f"no checkpoint in {self.directory} could be read (steps "
        f"{', '.join(str(s) for s, _ in unreadable)}; the newest failed with: "
        f"{unreadable[0][1] if unreadable else 'none found'}); nothing was moved or "
        "deleted: move the folder away to start from scratch")

  def _set_aside(self, step: int) -> str:
    """Moves step ``step`` out of the manager's sight, keeping its files."""
    aside = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR,
                         f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), aside)
    self.manager.reload()
    return aside

  def close(self) -> None:
    """Waits for a pending save (see ``wait``), then releases orbax's threads."""
    try:
      self.wait()
    finally:
      self.manager.close()


def _write_error(step: int, directory: str, e: Exception) -> CheckpointError:
  reason = (e.strerror if isinstance(e, OSError) and e.strerror else
            f"{type(e).__name__}: {e}")
  return CheckpointError(f"cannot write checkpoint step {step} to {directory}: {reason}; "
                         "the earlier checkpoints are kept")


def _check_shapes(expected, got) -> None:
  """Orbax restores what was saved; a changed model must fail here, loudly.

  ``got`` holds arrays or orbax's array metadata (both have ``shape``).
  """
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  have = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, leaf in want:
    name = jax.tree_util.keystr(path)
    if path not in have:
      raise ValueError(f"the checkpoint lacks {name} (did the config change?)")
    if tuple(getattr(have[path], "shape", ())) != tuple(getattr(leaf, "shape", ())):
      raise ValueError(
          f"{name} has shape {tuple(have[path].shape)} in the checkpoint but "
          f"{tuple(leaf.shape)} in the model (did the config change?)")
  extra = sorted(set(have) - {path for path, _ in want}, key=jax.tree_util.keystr)
  if extra:
    raise ValueError(f"the checkpoint has {jax.tree_util.keystr(extra[0])} that the model "
                     f"lacks (did the config change?)")
