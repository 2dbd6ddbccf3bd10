"""Dates offline: human-readable dates and their ISO 8601 form.

Each split draws from its own calendar days (``dates.split_dates``), so the
validation and test sets are dates the model never saw in any format.

| config  | train / validation / test | use |
|---------|---------------------------|-----|
| default | 20,000 / 1,000 / 2,000    | the translation experiments |
| smoke   | 256 / 64 / 64             | tests |

The split seed is part of the dataset version (it fixes the held-out days and
examples), hence a constant per config rather than an option.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from attention_lab.data import dates

DEFAULT_SPLIT_SEED = 20240621
SMOKE_SPLIT_SEED = 20240622


@dataclasses.dataclass(eq=False)
class DatesConfig(tfds.core.BuilderConfig):
  """Split sizes and the seed that fixes the day partition and examples."""
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 2_000
  split_seed: int = DEFAULT_SPLIT_SEED


class DatesOffline(tfds.core.GeneratorBasedBuilder):
  """Date strings in 16 formats -> ISO dates, prepared without network access."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "16 formats, 1950-2049, splits on disjoint days."}
  BUILDER_CONFIGS = [
      DatesConfig(name="default", description="20,000 / 1,000 / 2,000 examples."),
      DatesConfig(name="smoke", description="256 / 64 / 64 examples: tests.",
                  num_train=256, num_validation=64, num_test=64,
                  split_seed=SMOKE_SPLIT_SEED),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Human-readable dates (1950-2049, 16 formats) and their "
                     "ISO 8601 form, for character-level translation."),
        features=tfds.features.FeaturesDict({
            "source": tfds.features.Text(doc="a date as people write it"),
            "target": tfds.features.Text(doc="the same date as YYYY-MM-DD"),
        }),
        supervised_keys=("source", "target"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    splits = dates.make_splits(
        config.split_seed,
        {"train": config.num_train, "validation": config.num_validation,
         "test": config.num_test})
    return {name: self._generate_examples(examples) for name, examples in splits.items()}

  def _generate_examples(self, examples):
    for index, (source, target) in enumerate(examples):
      yield index, {"source": source, "target": target}
