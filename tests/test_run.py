"""``run.py`` as a user calls it: experiments, overrides and their errors."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

import experiments
from attention_lab import layers
from attention_lab import models
from attention_lab import train
from attention_lab.train import tasks
from attention_lab.train import validation
from attention_lab.viz import drawers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, **(env or {})})


def test_every_experiment_defines_the_common_fields():
  assert "mnist_vit" in experiments.names()
  for name in experiments.names():
    config = experiments.get_config(name)
    assert config.experiment == name
    for field in ("seed", "total_steps", "batch_size", "eval_every", "checkpoint_every"):
      assert field in config, f"{name} lacks {field}"
    # Every model with dot-product attention takes its attention settings
    # (kernel, mods, ...) from the config, all of them.
    if models.takes_attention_config(models.MODELS[config.model.name]):
      assert set(config.model.attention) == {
          f.name for f in dataclasses.fields(layers.AttentionConfig)}, name


def test_unknown_experiment_exits_listing_the_available_ones(tmp_path):
  proc = _run("--experiment=mnist_vitt", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "unknown experiment 'mnist_vitt'" in proc.stderr
  assert "mnist_vit" in proc.stderr.split("available experiments:")[1]
  with pytest.raises(ValueError, match="available experiments"):
    experiments.get_config("nope")


def test_missing_experiment_flag(tmp_path):
  proc = _run(f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "--experiment is required" in proc.stderr


def _config_error_lines(proc):
  """The ``error:`` lines of a run rejected by config validation, checked to be
  all it printed (no traceback) and to have exited with run.py's status 2."""
  lines = proc.stderr.strip().splitlines()
  # The message leads with the exit status and the last line (a traceback's
  # error), then the tail of what the run printed.
  said = f"exit {proc.returncode}, last line {lines[-1:]}; stderr ends:\n{proc.stderr[-3000:]}"
  assert proc.returncode == 2, said
  assert lines and all(line.startswith("error: config.") for line in lines), said
  return lines


# A tiny run around each bad value: should its check ever be missing, the run
# gets past validation and fails (or wrongly succeeds) in seconds, not minutes.
SHORT_RUN = ("--config.total_steps=2", "--config.optimizer.warmup_steps=1",
             "--config.model.num_layers=1", "--config.model.hidden_dim=16",
             "--config.data.eval_split=test[:20]", "--config.viz.num_examples=1")

# (overrides, the one line's start: field and value, what it says is allowed)
BAD_CONFIGS = {
    "negative_steps": (["--config.total_steps=-5"], "error: config.total_steps=-5:",
                       "must be a positive integer"),
    "zero_batch": (["--config.batch_size=0"], "error: config.batch_size=0:",
                   "must be a positive integer"),
    "unknown_key": (["--config.learning_rate=0.1"], "error: config.learning_rate=0.1:",
                    "did you mean config.optimizer.learning_rate?"),
    "unknown_model_key": (["--config.model.depthh", "3"], "error: config.model.depthh=3:",
                          "config.model has: attention"),
    "unknown_kernel": (["--config.model.attention.kernel=nope"],
                       "error: config.model.attention.kernel='nope':",
                       "known kernels: blockwise"),
    "kernel_typo": (["--config.model.attention.kernel=blockwize"],
                    "error: config.model.attention.kernel='blockwize':",
                    "did you mean blockwise?"),
    "unknown_score_mod": (["--config.model.attention.score_mod=alibj"],
                          "error: config.model.attention.score_mod='alibj':",
                          "unknown attention mod 'alibj'"),
    "mask_as_score_mod": (["--config.model.attention.score_mod=causal"],
                          "error: config.model.attention.score_mod='causal':",
                          "set it as attention.mask_mod"),
    "zero_learning_rate": (["--config.optimizer.learning_rate=0.0"],
                           "error: config.optimizer.learning_rate=0.0:", "> 0"),
    "warmup_past_the_end": (["--config.optimizer.warmup_steps=3"],
                            "error: config.optimizer.warmup_steps=3:",
                            "at most total_steps (2)"),
    "unknown_optimizer": (["--config.optimizer.name=sgd"], "error: config.optimizer.name='sgd':",
                          "must be one of adamw"),
    "unknown_model": (["--config.model.name=vitt"], "error: config.model.name='vitt':",
                      "did you mean vit?"),
    "unknown_dataset": (["--config.data.name=mnist_ofline"],
                        "error: config.data.name='mnist_ofline':", "did you mean mnist_offline?"),
    "compute_dtype": (["--config.model.dtype=bf16"], "error: config.model.dtype='bf16':",
                      "did you mean bfloat16?"),
    "mesh": (["--config.mesh.sequence=0"], "error: config.mesh.sequence=0:",
             "must be a positive integer"),
    "viz_kind": (["--config.viz.kind=picture"], "error: config.viz.kind='picture':",
                 "must be one of " + ", ".join(sorted(drawers.DRAWERS))),
    "task": (["--config.task=regression"], "error: config.task='regression':",
             "must be one of " + ", ".join(sorted(tasks.TASKS))),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, case):
  overrides, start, allowed = BAD_CONFIGS[case]
  workdir = tmp_path / "run"
  # Later flags win: the case's own value replaces SHORT_RUN's.
  proc = _run("--experiment=mnist_vit", f"--workdir={workdir}", *SHORT_RUN, *overrides)
  lines = _config_error_lines(proc)
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(start) and allowed in lines[0], lines[0]
  assert not workdir.exists()


def test_every_problem_gets_its_own_line_in_every_mode(tmp_path):
  workdir = tmp_path / "run"
  for mode in ("train", "eval", "visualize"):
    proc = _run("--experiment=mnist_vit", f"--workdir={workdir}", f"--mode={mode}",
                "--config.total_steps=0", "--config.keep_checkpoints=0",
                "--config.model.attention.kernel=nope")
    lines = _config_error_lines(proc)
    assert [line.split(": ")[1] for line in lines] == [
        "config.total_steps=0", "config.keep_checkpoints=0", "config.model.attention.kernel='nope'"], mode
    assert not workdir.exists()


def test_existing_empty_workdir_is_left_empty(tmp_path):
  proc = _run("--experiment=mnist_vit", f"--workdir={tmp_path}", "--config.eval_every=0")
  assert _config_error_lines(proc) == ["error: config.eval_every=0: must be a positive integer"]
  assert not os.listdir(tmp_path)


def test_library_callers_get_the_same_lines_as_a_value_error(tmp_path, tiny_config):
  config = tiny_config(total_steps=-5, batch_size=0, **{"model.attention.kernel": "nope"})
  workdir = tmp_path / "run"
  for run_mode in (train.train_and_evaluate, train.evaluate_checkpoint,
                   train.visualize_checkpoint):
    with pytest.raises(ValueError) as error:
      run_mode(config, str(workdir))
    assert str(error.value).splitlines() == validation.problems(config)
    assert [line.split(": ")[0] for line in error.value.lines] == [
        "config.total_steps=-5", "config.batch_size=0", "config.model.attention.kernel='nope'"]
    assert not workdir.exists()


def test_every_experiment_config_is_valid():
  for name in experiments.names():
    assert validation.problems(experiments.get_config(name)) == [], name


def test_validation_lists_match_what_the_loop_builds():
  from attention_lab.train import optim
  config = experiments.get_config("mnist_vit")
  for name in validation.OPTIMIZERS:
    config.optimizer.name = name
    optim.make_optimizer(config)
  config.optimizer.name = "sgd"
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.make_optimizer(config)


def test_validation_does_not_import_tensorflow():
  proc = subprocess.run(
      [sys.executable, "-c", "import sys; from attention_lab.train import validation; "
       "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "[]"


def test_eval_mode_without_checkpoint_exits_non_zero(tmp_path, data_dir):
  proc = _run("--experiment=mnist_vit", f"--workdir={tmp_path}", "--mode=eval",
              f"--config.data.data_dir={data_dir}")
  assert proc.returncode != 0 and "no checkpoint" in proc.stderr


def test_visualize_mode_without_checkpoint_writes_nothing(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = _run("--experiment=mnist_vit", f"--workdir={workdir}", "--mode=visualize",
              f"--config.data.data_dir={data_dir}")
  assert proc.returncode != 0 and "no checkpoint" in proc.stderr
  assert not workdir.exists()


def test_overrides_reach_the_run(tmp_path, data_dir):
  """A two-step run through the command line, kernel chosen by flag."""
  proc = _run("--experiment=mnist_vit", f"--workdir={tmp_path}",
              f"--config.data.data_dir={data_dir}", "--config.data.eval_split=test[:20]",
              "--config.total_steps=2", "--config.optimizer.warmup_steps=1",
              "--config.batch_size=8", "--config.log_every=1",
              "--config.model.num_layers=1", "--config.model.hidden_dim=16",
              "--config.model.patch_size=7", "--config.model.stem=patch",
              "--config.model.attention.kernel=reference",
              "--config.viz.num_examples=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2/2" in proc.stderr and "steps/s" in proc.stderr and "ETA" in proc.stderr
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["attention"]["kernel"] == "reference" and saved["total_steps"] == 2
  # The flag reached the layers: the kernel that ran is the one named.
  ran = re.findall(r"attention kernel on cpu for [^:]*: (\S+)", proc.stderr)
  assert ran and set(ran) == {"reference"}, ran
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["step"] == 2

  # --mode=visualize redraws the latest checkpoint, here for three examples.
  proc = _run("--experiment=mnist_vit", f"--workdir={tmp_path}", "--mode=visualize",
              f"--config.data.data_dir={data_dir}", "--config.data.eval_split=test[:20]",
              "--config.model.num_layers=1", "--config.model.hidden_dim=16",
              "--config.model.patch_size=7", "--config.model.stem=patch",
              "--config.viz.num_examples=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  drawn = os.listdir(tmp_path / "attention")
  assert len([n for n in drawn if n.startswith("example2_")]) == 3
  assert not any(n.startswith("example3_") for n in drawn)
  index = (tmp_path / "attention" / "index.html").read_text()
  assert all(n in index for n in drawn if n.endswith(".png"))


@pytest.mark.parametrize("override, status, line, workdir_left", [
    ("--config.model.attention.kernel=splash", 2,
     "error: config.model.attention.kernel='splash': attention kernel 'splash' does not run "
     "on cpu (platforms: tpu); pin it to its platform instead, e.g. 'tpu=splash'", False),
    ("--config.data.train_split=trian", 1,
     "error: config.data.train_split='trian': dataset 'mnist_offline': Unknown split "
     "'trian'. Should be one of", True),
])
def test_what_only_the_devices_or_the_data_show_is_one_line_too(tmp_path, override, status,
                                                                 line, workdir_left):
  """Checked once JAX or the dataset is up (after TensorFlow has logged its
  own lines): the last line names the field, no traceback, nothing written."""
  workdir = tmp_path / "run"
  proc = _run("--experiment=mnist_vit", f"--workdir={workdir}", *SHORT_RUN, override)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith(line), lines[-1]
  if workdir_left:     # made (and proved writable) before the data is read: left empty
    assert not workdir.exists() or not any(workdir.iterdir())
  else:
    assert not workdir.exists()
