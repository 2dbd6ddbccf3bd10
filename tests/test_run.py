"""``run.py`` as a user calls it: experiments, overrides and their errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import experiments
from attention_lab import models

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
    # Every model with dot-product attention takes its kernel from the config.
    model_fields = {f.name for f in dataclasses.fields(models.MODELS[config.model.name])}
    assert ("kernel" in config.model) == ("kernel" in model_fields), name


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


def test_unknown_config_key_exits_naming_it(tmp_path):
  proc = _run("--experiment=mnist_vit", f"--workdir={tmp_path}", "--config.model.depthh=3")
  assert proc.returncode != 0
  assert "depthh" in proc.stderr
  assert not os.listdir(tmp_path)


def test_unknown_kernel_exits_naming_it(tmp_path, data_dir):
  proc = _run("--experiment=mnist_vit", f"--workdir={tmp_path}",
              "--config.model.kernel=flashy", f"--config.data.data_dir={data_dir}")
  assert proc.returncode != 0
  assert "unknown attention kernel 'flashy'" in proc.stderr


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
              "--config.total_steps=2", "--config.batch_size=8", "--config.log_every=1",
              "--config.model.num_layers=1", "--config.model.hidden_dim=16",
              "--config.model.patch_size=7", "--config.model.stem=patch",
              "--config.model.kernel=reference",
              "--config.viz.num_examples=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2/2" in proc.stderr and "steps/s" in proc.stderr and "ETA" in proc.stderr
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["kernel"] == "reference" and saved["total_steps"] == 2
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
