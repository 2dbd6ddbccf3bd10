"""Faults a long run meets, provoked for real: SIGKILL at any moment and in the
middle of a checkpoint save, SIGTERM, damaged checkpoints, non-finite loss,
an unusable work directory, a full disk, and a config changed between save
and resume. Each must end in a clear message or an exact resume, and no fault
may cost a checkpoint that was already saved."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attention_lab import train
from attention_lab.train import checkpoint as checkpoint_lib
from conftest import ROOT
from conftest import tiny_vit_config

# A run long enough to be interrupted several times: 60 steps, a checkpoint
# every 10, nothing drawn before the end.
RUN_FLAGS = ["--config.total_steps=60", "--config.checkpoint_every=10", "--config.log_every=5",
             "--config.eval_every=1000", "--config.batch_size=16",
             "--config.eval_batch_size=50", "--config.data.eval_split=test[:50]",
             "--config.model.hidden_dim=16", "--config.model.num_layers=1",
             "--config.model.num_heads=2", "--config.model.mlp_dim=16",
             "--config.model.stem=patch", "--config.optimizer.warmup_steps=5",
             "--config.viz.num_examples=1"]

# Run as `python -c` to die inside orbax's save: the state item is written
# into a temporary folder, then the process is SIGKILLed before the save is
# finalised, exactly as a machine lost mid-save.
DIE_IN_SAVE = textwrap.dedent("""
    import os, signal, sys
    import orbax.checkpoint as ocp
    kill_step = int(os.environ["KILL_AT_SAVE_OF_STEP"])
    from attention_lab.train import checkpoint
    original = checkpoint.Checkpoints.save
    def save(self, step, state, record):
      if step == kill_step:
        def die(*args, **kwargs):
          os.kill(os.getpid(), signal.SIGKILL)
        for name in ("save", "async_save"):
          if hasattr(ocp.JsonCheckpointHandler, name):
            setattr(ocp.JsonCheckpointHandler, name, die)
      return original(self, step, state, record)
    checkpoint.Checkpoints.save = save
    sys.argv = ["run.py"] + sys.argv[1:]
    import runpy
    runpy.run_path("run.py", run_name="__main__")
""")


def _command(workdir, data_dir, *extra):
  return [sys.executable, "run.py", "--experiment=mnist_vit", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *RUN_FLAGS, *extra]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")


def _steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _wait_for_checkpoint(process, workdir, timeout=300):
  start = time.time()
  while not _steps(workdir):
    assert process.poll() is None, "the run ended before its first checkpoint"
    assert time.time() - start < timeout
    time.sleep(0.02)


def _final_params(workdir):
  ckpts = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=3)
  try:
    step = ckpts.latest_step()
    restored = ckpts.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    return step, jax.tree_util.tree_map(np.asarray, restored["state"]["params"])
  finally:
    ckpts.close()


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results.pop("wall_time_s")
  return results


def _digest(folder):
  """Hash of every file under ``folder`` (names and bytes)."""
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(folder)):
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, folder).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def test_killed_and_terminated_run_ends_like_an_uninterrupted_one(tmp_path, data_dir):
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  subprocess.run(_command(straight, data_dir), cwd=ROOT, env=_env(), check=True,
                 capture_output=True, timeout=600)

  # 1. SIGKILL at an arbitrary moment after the first checkpoint.
  process = subprocess.Popen(_command(broken, data_dir), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for_checkpoint(process, broken)
  process.kill()
  assert process.wait(timeout=60) == -signal.SIGKILL
  first = _steps(broken)
  assert first and first[-1] < 60

  # 2. SIGKILL inside the save of the next checkpoint: the half-written save
  # must not count as a checkpoint.
  kill_step = first[-1] + 10
  died = subprocess.run(
      [sys.executable, "-c", DIE_IN_SAVE, *_command(broken, data_dir)[2:]], cwd=ROOT,
      env=dict(_env(), KILL_AT_SAVE_OF_STEP=str(kill_step)), capture_output=True,
      timeout=600)
  assert died.returncode == -signal.SIGKILL, died.stderr.decode()[-2000:]
  assert kill_step not in _steps(broken)
  assert max(_steps(broken)) < kill_step

  # 3. SIGTERM: saves where it stands and exits cleanly.
  process = subprocess.Popen(_command(broken, data_dir), cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  before = max(_steps(broken))
  start = time.time()
  while max(_steps(broken)) == before:        # wait until it is training again
    assert process.poll() is None and time.time() - start < 300
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  log = process.communicate(timeout=120)[0].decode()
  assert process.returncode == 0, log[-2000:]
  stopped = int(log.split("stopped at step ")[1].split()[0])
  assert "on SIGTERM" in log
  assert before < stopped < 60 and max(_steps(broken)) == stopped   # saved where it stood

  # 4. The same command finishes the run.
  subprocess.run(_command(broken, data_dir), cwd=ROOT, env=_env(), check=True,
                 capture_output=True, timeout=600)
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(broken)
  assert step_a == step_b == 60
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)
  assert _results(straight) == _results(broken)


def _tiny(data_dir, **overrides):
  return tiny_vit_config(data_dir, **{"total_steps": 6, "checkpoint_every": 2,
                                      "log_every": 1, **overrides})


def _state_files(workdir, step):
  folder = os.path.join(workdir, "checkpoints", str(step), "state")
  return [os.path.join(root, f) for root, _, files in os.walk(folder) for f in files]


# Both damages take the same fallback path; the second runs with -m slow.
@pytest.mark.parametrize("damage", ["truncated_data",
                                    pytest.param("missing_metadata", marks=pytest.mark.slow)])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, damage):
  config = _tiny(data_dir)
  straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, damaged, stop_after=4)
  assert _steps(damaged) == [2, 4]
  good = _digest(os.path.join(damaged, "checkpoints", "2"))
  if damage == "truncated_data":
    data = [p for p in _state_files(damaged, 4) if os.sep + "d" + os.sep in p]
    assert data
    for path in data:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(os.path.join(damaged, "checkpoints", "4", "state", "_METADATA"))

  results = train.train_and_evaluate(config, damaged)   # warns, resumes from 2
  assert results["step"] == 6
  aside = os.path.join(damaged, checkpoint_lib.UNREADABLE_DIR)
  assert len(os.listdir(aside)) == 1                    # moved, not deleted
  assert os.listdir(os.path.join(aside, os.listdir(aside)[0]))
  _, params_a = _final_params(straight)
  _, params_b = _final_params(damaged)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_a, params_b)
  # Step 2 was read as it was (then kept: 3 checkpoints are kept).
  assert _digest(os.path.join(damaged, "checkpoints", "2")) == good


def test_every_checkpoint_unreadable_is_an_error_that_moves_nothing(tmp_path, data_dir):
  config = _tiny(data_dir)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, stop_after=2)
  os.remove(os.path.join(workdir, "checkpoints", "2", "state", "_METADATA"))
  before = _digest(workdir)
  with pytest.raises(train.CheckpointError, match="could be read.*nothing was moved"):
    train.train_and_evaluate(config, workdir)
  assert _digest(workdir) == before       # a fault hitting every step moves nothing
  assert not os.path.exists(os.path.join(workdir, checkpoint_lib.UNREADABLE_DIR))


def test_non_finite_loss_stops_naming_step_and_metric_and_keeps_last_good(tmp_path, data_dir):
  # A learning rate of 1e15 makes the parameters huge but finite after the
  # first update (Adam's step is about the learning rate whatever the
  # gradient); the next forward pass overflows.
  config = _tiny(data_dir, **{"optimizer.learning_rate": 1e15, "optimizer.warmup_steps": 0,
                              "checkpoint_every": 1})
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteError,
                     match=r"non-finite (loss|grad_norm|param_norm) .* at step \d+") as error:
    train.train_and_evaluate(config, workdir)
  bad_step = int(str(error.value).split("at step ")[1].split(";")[0])
  steps = _steps(workdir)
  assert bad_step >= 2 and steps and max(steps) == bad_step - 1   # saved up to the last good step
  _, params = _final_params(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_debug_nans_stops_at_the_operation(tmp_path, data_dir):
  # A NaN learning rate is refused up front by the config check, so the NaN
  # comes from the run itself: a huge learning rate overflows the second step.
  config = _tiny(data_dir, **{"optimizer.learning_rate": 1e15, "optimizer.warmup_steps": 0,
                              "debug_nans": True})
  with pytest.raises(FloatingPointError, match=r"invalid value \(nan\)") as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert not isinstance(error.value, train.NonFiniteError)   # JAX's checker, not the loop's


def test_debug_nans_passes_a_healthy_run(tmp_path, data_dir):
  """A healthy run passes JAX's NaN checker (the padded text and seq2seq runs
  in test_text_experiments run with it on as well)."""
  config = _tiny(data_dir, **{"debug_nans": True, "total_steps": 2})
  assert train.train_and_evaluate(config, str(tmp_path))["step"] == 2


def test_unusable_workdir_is_a_clear_error(tmp_path, data_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = str(blocker / "run")
  with pytest.raises(train.WorkdirError, match="not usable"):
    train.train_and_evaluate(_tiny(data_dir), workdir)
  result = subprocess.run(
      [sys.executable, "run.py", "--experiment=mnist_vit", f"--workdir={workdir}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "error: work directory" in result.stderr and "Traceback" not in result.stderr


def test_full_disk_during_save_is_a_clear_error_and_keeps_saved_checkpoints(
    tmp_path, data_dir, monkeypatch):
  config = _tiny(data_dir)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, stop_after=2)
  saved = _digest(os.path.join(workdir, "checkpoints", "2"))
  original = ocp.CheckpointManager.save

  def full(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(train.CheckpointError, match="No space left on device"):
    train.train_and_evaluate(config, workdir)
  assert _steps(workdir) == [2]
  assert _digest(os.path.join(workdir, "checkpoints", "2")) == saved


def test_config_changed_between_save_and_resume(tmp_path, data_dir):
  workdir = str(tmp_path)
  train.train_and_evaluate(_tiny(data_dir), workdir, stop_after=2)
  before = _digest(workdir)
  wider = _tiny(data_dir, **{"model.hidden_dim": 32})
  with pytest.raises(train.CheckpointMismatch, match=r"shape .* in the checkpoint"):
    train.train_and_evaluate(wider, workdir)
  deeper = _tiny(data_dir, **{"model.num_layers": 3})
  with pytest.raises(train.CheckpointMismatch, match="lacks"):
    train.train_and_evaluate(deeper, workdir)
  assert _digest(workdir) == before                  # checkpoints, config.json untouched
  assert not os.path.exists(os.path.join(workdir, checkpoint_lib.UNREADABLE_DIR))
  result = subprocess.run(
      [sys.executable, "run.py", "--experiment=mnist_vit", f"--workdir={workdir}",
       f"--config.data.data_dir={data_dir}", "--config.model.hidden_dim=32",
       "--config.model.num_layers=2", "--config.model.num_heads=2",
       "--config.model.mlp_dim=32", "--config.model.patch_size=7",
       "--config.model.stem=patch"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "does not fit this model" in result.stderr
  assert _digest(workdir) == before
