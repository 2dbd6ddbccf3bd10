"""Spoken sentences offline: short commands and digit strings spoken by eSpeak NG.

Features: ``audio`` int16 ``[32000]`` (two seconds at 16 kHz), ``text``
(the transcript) and ``speaker`` (``accent+variant``). Validation and test
are spoken by voice variants never used in training (``spoken_sentences``).

| config  | train / validation / test | use |
|---------|---------------------------|-----|
| default | 8,000 / 400 / 800         | spoken_sentences_las (59 s to prepare, 2 cores; 563 MB) |
| smoke   | 64 / 16 / 16              | tests |

The seed fixes the recipe and is part of the dataset version, hence a
constant per config rather than an option.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data import spoken_sentences


@dataclasses.dataclass(eq=False)
class SpokenSentencesConfig(tfds.core.BuilderConfig):
  """Split sizes and the seed of the recipe."""
  num_train: int = 8_000
  num_validation: int = 400
  num_test: int = 800
  seed: int = 20241818


class SpokenSentencesOffline(tfds.core.GeneratorBasedBuilder):
  """Synthesised two-second spoken sentences, prepared without network access."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "eSpeak NG speakers; splits on disjoint voice variants."}
  BUILDER_CONFIGS = [
      SpokenSentencesConfig(name="default", description="8,000 / 400 / 800 clips."),
      SpokenSentencesConfig(name="smoke", description="64 / 16 / 16 clips: tests.",
                            num_train=64, num_validation=16, num_test=16, seed=20241819),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Commands and digit strings from a small grammar, synthesised with "
                     "eSpeak NG: two seconds at 16 kHz, noise added, validation and test "
                     "voices unheard in training."),
        features=tfds.features.FeaturesDict({
            # Raw bytes, as speech_commands_offline (Audio's encoding is 3x larger).
            "audio": tfds.features.Tensor(shape=(spoken_sentences.CLIP_SAMPLES,),
                                          dtype=np.int16,
                                          encoding=tfds.features.Encoding.BYTES,
                                          doc="16 kHz samples, full scale 32768"),
            "text": tfds.features.Text(doc="the transcript, lower case"),
            "speaker": tfds.features.Text(doc="eSpeak accent+variant"),
        }),
        supervised_keys=("audio", "text"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    sizes = {"train": config.num_train, "validation": config.num_validation,
             "test": config.num_test}
    return {split: self._generate_examples(config.seed, split, size)
            for split, size in sizes.items()}

  def _generate_examples(self, seed, split, size):
    for index, (clip, plan) in enumerate(spoken_sentences.examples(seed, split, size)):
      yield index, {"audio": clip, "text": plan["text"], "speaker": plan["speaker"]}
