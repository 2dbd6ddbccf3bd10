"""Input pipelines. ``build(config)`` returns the train batches and eval split.

A dataset entry names how to read it (a local builder or a TFDS name) and how
to turn its features into model inputs. Every batch is a dict with ``inputs``
and ``label`` (and ``weight`` in evaluation). ``config.data.name`` may carry a
builder config after a slash (``listops_offline/lra``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

from attention_lab.data import audio
from attention_lab.data import captions
from attention_lab.data import images
from attention_lab.data import pipeline
from attention_lab.data import scenes
from attention_lab.data import sources
from attention_lab.data import spoken_sentences
from attention_lab.data import text
from attention_lab.data import videos
from attention_lab.data.pipeline import TrainBatches
from attention_lab.data.pipeline import eval_batches
from attention_lab.data.pipeline import take


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read a dataset and shape it for a model.

  Attributes:
    source: ``sources.load_split`` name (local builder or TFDS name).
    to_inputs: ``(TFDS features, config.data) -> {"inputs", "label"}`` arrays.
    num_classes: label count (classification) or vocabulary size (seq2seq).
    augment: ``config.data -> transform or None`` for training batches, or
      None when the data has no augmentation.
    vocabulary: token strings by id, for pictures of token inputs.
    class_names: label names by id, where they read better than numbers.
    fixed_lengths: feature -> length, for features stored at varying
      lengths (``sources.load_split``).
    example_map: ``config.data -> per-example TensorFlow map`` for examples
      of varying shape (``sources.load_split``'s ``example_map``), or None.
  """
  source: str
  to_inputs: Callable
  num_classes: int
  augment: Callable = None
  vocabulary: Optional[Sequence[str]] = None
  class_names: Optional[Sequence[str]] = None
  fixed_lengths: Optional[Dict[str, int]] = None
  example_map: Optional[Callable] = None


DATASETS: Dict[str, DatasetSpec] = {
    "mnist_offline": DatasetSpec("mnist_offline", images.to_model_inputs, 10,
                                 images.augmentation),
    "mnist": DatasetSpec("mnist", images.to_model_inputs, 10, images.augmentation),
    "cifar10": DatasetSpec("cifar10", images.to_model_inputs, 10,
                           images.augmentation),
    "listops_offline": DatasetSpec("listops_offline", text.listops_inputs, 10,
                                   vocabulary=text.listops.VOCABULARY),
    "imdb_reviews": DatasetSpec("imdb_reviews", text.bytes_inputs, 2,
                                vocabulary=text.BYTE_VOCABULARY),
    "dates_offline": DatasetSpec("dates_offline", text.dates_inputs,
                                 len(text.dates.CHARS), vocabulary=text.dates.CHARS),
    "numbers_offline": DatasetSpec("numbers_offline", text.numbers_inputs,
                                   len(text.numbers.CHARS), vocabulary=text.numbers.CHARS),
    "moving_digits_offline": DatasetSpec("moving_digits_offline", videos.video_inputs, 2),
    "mnist_captions_offline": DatasetSpec("mnist_captions_offline", captions.caption_inputs,
                                          len(captions.WORDS), vocabulary=captions.WORDS),
    "digit_scenes_offline": DatasetSpec("digit_scenes_offline", scenes.detection_inputs, 10,
                                        example_map=scenes.pad_objects),
    # An online TFDS detection dataset reads through the same functions,
    # e.g. --config.data.name=voc/2007 (20 classes; colour, resized).
    "voc": DatasetSpec("voc", scenes.detection_inputs, 20, example_map=scenes.pad_objects),
    "spoken_sentences_offline": DatasetSpec("spoken_sentences_offline",
                                            spoken_sentences.recognition_inputs,
                                            len(spoken_sentences.CHARS),
                                            vocabulary=spoken_sentences.CHARS),
    "speech_commands_offline": DatasetSpec("speech_commands_offline", audio.speech_inputs,
                                           12, audio.augmentation,
                                           class_names=audio.LABELS),
    "speech_commands": DatasetSpec("speech_commands", audio.speech_inputs, 12,
                                   audio.augmentation, class_names=audio.LABELS,
                                   fixed_lengths=audio.FIXED_LENGTHS),
}


@dataclasses.dataclass
class Data:
  """What the training loop needs from a dataset."""
  train: TrainBatches
  eval: pipeline.Arrays
  num_classes: int
  vocabulary: Optional[Sequence[str]] = None
  class_names: Optional[Sequence[str]] = None


def get_spec(name: str) -> DatasetSpec:
  """The spec of ``name`` (``base`` or ``base/builder_config``)."""
  base, _, config = name.partition("/")
  if base not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
  spec = DATASETS[base]
  return dataclasses.replace(spec, source=f"{spec.source}/{config}") if config else spec


def build(config) -> Data:
  """Reads ``config.data`` and returns train batches and the eval split.

  Uses ``config.data.{name, data_dir, train_split, eval_split, augment_shift,
  augment_flip, grayscale, max_length}``,
  ``config.batch_size`` and ``config.seed``.
  """
  spec = get_spec(config.data.name)
  example_map = spec.example_map(config.data) if spec.example_map is not None else None

  def load(field):
    split = config.data[field]
    try:
      arrays = sources.load_split(spec.source, split, config.data.data_dir,
                                  fixed_lengths=spec.fixed_lengths, example_map=example_map)
    except sources.SplitError as e:
      raise sources.SplitError(f"config.data.{field}={split!r}: {e}") from None
    return spec.to_inputs(arrays, config.data)

  train, evaluation = load("train_split"), load("eval_split")
  if config.data.grayscale:
    train, evaluation = images.to_grayscale(train), images.to_grayscale(evaluation)
  transform = spec.augment(config.data) if spec.augment is not None else None
  return Data(
      train=TrainBatches(train, config.batch_size, config.seed, transform),
      eval=evaluation, num_classes=spec.num_classes, vocabulary=spec.vocabulary,
      class_names=spec.class_names)


__all__ = ["DATASETS", "Data", "DatasetSpec", "TrainBatches", "build",
           "eval_batches", "get_spec", "take"]
