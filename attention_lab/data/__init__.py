"""Input pipelines. ``build(config)`` returns the train batches and eval split.

A dataset entry names how to read it (a local builder or a TFDS name) and how
to turn its features into model inputs. Every batch is a dict with ``inputs``
and ``label`` (and ``weight`` in evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

from attention_lab.data import images
from attention_lab.data import pipeline
from attention_lab.data import sources
from attention_lab.data.pipeline import TrainBatches
from attention_lab.data.pipeline import eval_batches


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read a dataset and shape it for a model.

  Attributes:
    source: ``sources.load_split`` name (local builder or TFDS name).
    to_inputs: TFDS features -> ``{"inputs", "label"}`` arrays.
    augment: ``config.data -> transform or None`` for training batches, or
      None when the data has no augmentation.
    num_classes: label count.
  """
  source: str
  to_inputs: Callable
  num_classes: int
  augment: Callable = None


DATASETS: Dict[str, DatasetSpec] = {
    "mnist_offline": DatasetSpec("mnist_offline", images.to_model_inputs, 10,
                                 images.augmentation),
    "mnist": DatasetSpec("mnist", images.to_model_inputs, 10, images.augmentation),
    "cifar10": DatasetSpec("cifar10", images.to_model_inputs, 10,
                           images.augmentation),
}


@dataclasses.dataclass
class Data:
  """What the training loop needs from a dataset."""
  train: TrainBatches
  eval: pipeline.Arrays
  num_classes: int


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


def build(config) -> Data:
  """Reads ``config.data`` and returns train batches and the eval split.

  Uses ``config.data.{name, data_dir, train_split, eval_split, augment_shift,
  augment_flip, grayscale}``,
  ``config.batch_size`` and ``config.seed``.
  """
  spec = get_spec(config.data.name)
  train = spec.to_inputs(sources.load_split(
      spec.source, config.data.train_split, config.data.data_dir))
  evaluation = spec.to_inputs(sources.load_split(
      spec.source, config.data.eval_split, config.data.data_dir))
  if config.data.grayscale:
    train, evaluation = images.to_grayscale(train), images.to_grayscale(evaluation)
  transform = spec.augment(config.data) if spec.augment is not None else None
  return Data(
      train=TrainBatches(train, config.batch_size, config.seed, transform),
      eval=evaluation, num_classes=spec.num_classes)


__all__ = ["DATASETS", "Data", "DatasetSpec", "TrainBatches", "build",
           "eval_batches", "get_spec"]
