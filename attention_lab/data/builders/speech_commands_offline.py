"""Speech commands offline: the 12 classes of TFDS ``speech_commands``, spoken by eSpeak NG.

Same features as TFDS ``speech_commands`` (``audio`` int16 at 16 kHz and
``label`` with the same names in the same order), so one pipeline reads
both; ``speaker`` (``accent+variant``, empty for silence) is extra.
Validation and test are spoken by voice variants never used in training
(``synthetic_speech_commands.split_variants``).

| config  | train / validation / test | use |
|---------|---------------------------|-----|
| default | 18,000 / 1,200 / 2,400    | the speech experiments (about 40 s to prepare, 660 MB) |
| smoke   | 240 / 60 / 60             | tests |

The seed fixes the recipe (speakers per split, word, rate, pitch, noise of
every example) and is part of the dataset version, hence a constant per
config rather than an option.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data import synthetic_speech_commands

DEFAULT_SEED = 20240705
SMOKE_SEED = 20240706


@dataclasses.dataclass(eq=False)
class SpeechCommandsConfig(tfds.core.BuilderConfig):
  """Split sizes and the seed of the recipe."""
  num_train: int = 18_000
  num_validation: int = 1_200
  num_test: int = 2_400
  seed: int = DEFAULT_SEED


class SpeechCommandsOffline(tfds.core.GeneratorBasedBuilder):
  """Synthesised one-second spoken commands, prepared without network access."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "eSpeak NG speakers; splits on disjoint voice variants."}
  BUILDER_CONFIGS = [
      SpeechCommandsConfig(name="default", description="18,000 / 1,200 / 2,400 clips."),
      SpeechCommandsConfig(name="smoke", description="240 / 60 / 60 clips: tests.",
                           num_train=240, num_validation=60, num_test=60, seed=SMOKE_SEED),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Ten command words, other words (_unknown_) and background noise "
                     "(_silence_), synthesised with eSpeak NG: one second at 16 kHz, "
                     "noise added, validation and test voices unheard in training."),
        features=tfds.features.FeaturesDict({
            # A raw-bytes tensor: Audio's integer encoding spends ten bytes
            # on every negative sample (measured: 92 KB per 32 KB clip), and
            # Audio does not take the bytes encoding.
            "audio": tfds.features.Tensor(shape=(synthetic_speech_commands.CLIP_SAMPLES,),
                                          dtype=np.int16,
                                          encoding=tfds.features.Encoding.BYTES,
                                          doc="16 kHz samples, full scale 32768"),
            "label": tfds.features.ClassLabel(names=list(synthetic_speech_commands.LABELS)),
            "speaker": tfds.features.Text(doc="eSpeak accent+variant; empty for silence"),
        }),
        supervised_keys=("audio", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    sizes = {"train": config.num_train, "validation": config.num_validation,
             "test": config.num_test}
    return {split: self._generate_examples(config.seed, split, size)
            for split, size in sizes.items()}

  def _generate_examples(self, seed, split, size):
    for index, (clip, plan) in enumerate(synthetic_speech_commands.examples(seed, split, size)):
      yield index, {"audio": clip, "label": plan["label"], "speaker": plan["speaker"]}
