"""Numbers offline: numbers in English words and in German or French words.

Generated with ``num2words`` (see ``attention_lab.data.numbers``); each split
holds distinct numbers and the held-out ones never occur in training.

| config | target | numbers | train / validation / test | use |
|--------|--------|---------|---------------------------|-----|
| de     | German | 0..99,999 | 20,000 / 1,000 / 2,000  | the translation experiments (default) |
| fr     | French | 0..99,999 | 20,000 / 1,000 / 2,000  | the same in French |
| smoke  | German | 0..9,999  | 256 / 64 / 64           | tests |

The split seed is part of the dataset version (it fixes which numbers are
held out), hence a constant per config rather than an option.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data import numbers

DEFAULT_SPLIT_SEED = 20261130
SMOKE_SPLIT_SEED = 20261131


@dataclasses.dataclass(eq=False)
class NumbersConfig(tfds.core.BuilderConfig):
  """Target language, the range of numbers, split sizes and their seed."""
  language: str = "de"
  largest: int = numbers.LARGEST_NUMBER
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 2_000
  split_seed: int = DEFAULT_SPLIT_SEED


class NumbersOffline(tfds.core.GeneratorBasedBuilder):
  """English number words -> German / French number words, prepared offline."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "num2words 0.5.14; numbers 0..99,999; splits of distinct numbers."}
  BUILDER_CONFIGS = [
      NumbersConfig(name="de", description="English -> German, 20,000 / 1,000 / 2,000."),
      NumbersConfig(name="fr", description="English -> French, 20,000 / 1,000 / 2,000.",
                    language="fr"),
      NumbersConfig(name="smoke", description="English -> German, 0..9,999, "
                    "256 / 64 / 64: tests.", largest=9_999, num_train=256,
                    num_validation=64, num_test=64, split_seed=SMOKE_SPLIT_SEED),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "de"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Numbers written in English words and in German or French "
                     "words (num2words), for character-level translation."),
        features=tfds.features.FeaturesDict({
            "source": tfds.features.Text(doc="the number in English words"),
            "target": tfds.features.Text(doc="the number in the config's language"),
            "number": tfds.features.Scalar(np.int32, doc="the number itself"),
        }),
        supervised_keys=("source", "target"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    splits = numbers.make_splits(
        config.split_seed,
        {"train": config.num_train, "validation": config.num_validation,
         "test": config.num_test},
        config.language, config.largest)
    return {name: self._generate_examples(examples) for name, examples in splits.items()}

  def _generate_examples(self, examples):
    for index, (source, target, number) in enumerate(examples):
      yield index, {"source": source, "target": target, "number": number}


def language_of(dataset_name: str) -> str:
  """The target language of ``numbers_offline`` or ``numbers_offline/CONFIG``."""
  base, _, config = dataset_name.partition("/")
  config = config or NumbersOffline.DEFAULT_BUILDER_CONFIG_NAME
  by_name = {c.name: c for c in NumbersOffline.BUILDER_CONFIGS}
  if base != "numbers_offline" or config not in by_name:
    raise ValueError(f"{dataset_name!r} is not a numbers_offline config; known: "
                     f"{', '.join('numbers_offline/' + n for n in by_name)}")
  return by_name[config].language
