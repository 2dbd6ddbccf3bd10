"""ListOps offline: the Long Range Arena task, generated with a fixed seed.

Three configs share ``listops.generate``'s recipe (depth at most 10, 2 to 10
arguments, operator probability 0.25, duplicates removed, splits disjoint) and
differ in the length window (tokens, both bounds exclusive) and the sizes:

| config | lengths      | train / validation / test | use |
|--------|--------------|---------------------------|-----|
| short  | 32 .. 256    | 96,000 / 2,000 / 2,000    | the CPU default |
| lra    | 500 .. 2,000 | 96,000 / 2,000 / 2,000    | Long Range Arena's setting |
| smoke  | 16 .. 64     | 512 / 128 / 128           | tests |

Each config's split seed is part of the dataset version: changing it changes
every split, including the test set, so it is a fixed constant rather than a
user option, and a new seed needs a new version.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data import listops

SHORT_SPLIT_SEED = 20240611
LRA_SPLIT_SEED = 20240612
SMOKE_SPLIT_SEED = 20240613


@dataclasses.dataclass(eq=False)
class ListopsConfig(tfds.core.BuilderConfig):
  """One length window and split sizes (lengths exclusive, in tokens)."""
  min_length: int = 32
  max_length: int = 256
  max_depth: int = 10
  max_args: int = 10
  num_train: int = 96_000
  num_validation: int = 2_000
  num_test: int = 2_000
  split_seed: int = SHORT_SPLIT_SEED


class ListopsOffline(tfds.core.GeneratorBasedBuilder):
  """ListOps expressions and their values, prepared without network access."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded LRA recipe; configs short, lra, smoke."}
  BUILDER_CONFIGS = [
      ListopsConfig(
          name="short", description="Lengths 33 to 255 tokens: the CPU default.",
          min_length=32, max_length=256, split_seed=SHORT_SPLIT_SEED),
      ListopsConfig(
          name="lra", description="Long Range Arena: lengths 501 to 1,999 tokens.",
          min_length=500, max_length=2000, split_seed=LRA_SPLIT_SEED),
      ListopsConfig(
          name="smoke", description="Lengths 17 to 63 tokens, 768 examples: tests.",
          min_length=16, max_length=64, num_train=512, num_validation=128,
          num_test=128, split_seed=SMOKE_SPLIT_SEED),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "short"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("ListOps (Long Range Arena recipe, seeded): the value 0-9 "
                     "of nested MAX/MIN/MED/SM expressions over digits."),
        features=tfds.features.FeaturesDict({
            "expression": tfds.features.Text(doc="tokens separated by spaces"),
            "label": tfds.features.ClassLabel(num_classes=listops.NUM_CLASSES),
            "length": tfds.features.Scalar(np.int32, doc="number of tokens"),
        }),
        supervised_keys=("expression", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    splits = listops.make_splits(
        config.split_seed,
        {"train": config.num_train, "validation": config.num_validation,
         "test": config.num_test},
        min_length=config.min_length, max_length=config.max_length,
        max_depth=config.max_depth, max_args=config.max_args)
    return {name: self._generate_examples(examples) for name, examples in splits.items()}

  def _generate_examples(self, examples):
    for index, (expression, label) in enumerate(examples):
      yield index, {"expression": expression, "label": label,
                    "length": len(expression.split())}
