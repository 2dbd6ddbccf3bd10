"""End to end on tiny offline MNIST: train, checkpoint, stop, resume, evaluate, draw."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from attention_lab import train
from attention_lab.train import checkpoint as checkpoint_lib
from attention_lab.train import loop


def _final_params(workdir, config):
  exp = loop.Experiment(config)
  state, _ = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), 3).restore(
      exp.initial_state)
  return state


def test_stopped_and_resumed_run_matches_uninterrupted_run(tmp_path, tiny_config):
  config = tiny_config(**{"model.dropout_rate": 0.1})      # dropout exercises the rng stream
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")

  results = train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_after=3)
  assert not os.path.exists(os.path.join(resumed, "results.json"))
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2", "3"]
  resumed_results = train.train_and_evaluate(config, resumed)

  a, b = _final_params(straight, config), _final_params(resumed, config)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for key in ("eval_loss", "eval_accuracy", "step"):
    assert results[key] == resumed_results[key]

  # results.json is what scripts read.
  with open(os.path.join(straight, "results.json")) as f:
    saved = json.load(f)
  assert saved["experiment"] == "mnist_vit" and saved["step"] == 6
  assert 0.0 <= saved["eval_accuracy"] <= 1.0 and saved["wall_time_s"] > 0
  # The history of the resumed run has no duplicate train rows.
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
  assert steps == sorted(set(steps)) == [2, 4, 6]
  # Only the newest checkpoints are kept.
  assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["2", "4", "6"]

  # --mode=eval reads the latest checkpoint and reproduces the final metrics.
  metrics = train.evaluate_checkpoint(config, straight)
  assert metrics["accuracy"] == pytest.approx(results["eval_accuracy"])

  # Pictures: real PNGs, the expected size, not blank.
  # Per example: the input, the attention over it, the head grid; and an index page.
  drawn = os.listdir(os.path.join(straight, "attention"))
  assert "index.html" in drawn
  pictures = [os.path.join(straight, "curves.png")] + [
      os.path.join(straight, "attention", f) for f in drawn if f.endswith(".png")]
  assert len(pictures) == 1 + 3 * config.viz.num_examples
  for path in pictures:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 150 and pixels.shape[1] > 200
    assert pixels.std() > 5, f"{path} looks blank"
  assert os.listdir(os.path.join(straight, "tensorboard"))


def test_training_learns_something(tmp_path, tiny_config):
  """A hundred steps of the tiny ViT beat chance clearly (10 classes: 10%;
  about 40% measured here)."""
  config = tiny_config(total_steps=100, checkpoint_every=100, eval_every=100, log_every=50,
                       batch_size=32, label_smoothing=0.0,
                       **{"data.eval_split": "test[:200]", "data.augment_shift": 0,
                          "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 10})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["eval_accuracy"] > 0.25


def test_eval_without_checkpoint_is_a_clear_error(tmp_path, tiny_config):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    train.evaluate_checkpoint(tiny_config(), str(tmp_path))
  assert not os.path.exists(tmp_path / "eval.json")


def test_resuming_with_a_changed_model_fails_and_keeps_checkpoints(tmp_path, tiny_config):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(checkpoint_lib.CheckpointMismatch, match=r"checkpoint step 2 .*does not fit.*shape"):
    train.train_and_evaluate(tiny_config(total_steps=4, **{"model.hidden_dim": 24}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["hidden_dim"] == 16      # the saved run's config stays


def test_corrupt_checkpoint_is_named_in_the_error(tmp_path, tiny_config):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  state_dir = os.path.join(workdir, "checkpoints", "2", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name != "commit_success.txt":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(checkpoint_lib.CheckpointError, match="could be read.*checkpoint step 2"):
    train.evaluate_checkpoint(tiny_config(total_steps=2), workdir)


@pytest.mark.slow
def test_mnist_vit_reaches_target(tmp_path, data_dir):
  """The README's main job: >= 97% on the 1,000 held-out digits (about 8 min here)."""
  import experiments
  config = experiments.get_config("mnist_vit")
  config.data.data_dir = data_dir
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["eval_accuracy"] >= 0.97
