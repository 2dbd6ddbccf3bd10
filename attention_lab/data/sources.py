"""Where examples come from: local TFDS builders offline, ``tfds.load`` online.

Both paths go through tensorflow-datasets and end in the same numpy arrays, so
the code a user runs with internet is the code the offline tests run.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import tensorflow_datasets as tfds

from attention_lab.data.builders.dates_offline import DatesOffline
from attention_lab.data.builders.digit_scenes_offline import DigitScenesOffline
from attention_lab.data.builders.listops_offline import ListopsOffline
from attention_lab.data.builders.mnist_captions_offline import MnistCaptionsOffline
from attention_lab.data.builders.mnist_offline import MnistOffline
from attention_lab.data.builders.moving_digits_offline import MovingDigitsOffline
from attention_lab.data.builders.numbers_offline import NumbersOffline
from attention_lab.data.builders.speech_commands_offline import SpeechCommandsOffline
from attention_lab.data.builders.spoken_sentences_offline import SpokenSentencesOffline

# Builders prepared locally from packaged or generated data (no network).
LOCAL_BUILDERS = {
    "mnist_offline": MnistOffline,
    "listops_offline": ListopsOffline,
    "dates_offline": DatesOffline,
    "digit_scenes_offline": DigitScenesOffline,
    "moving_digits_offline": MovingDigitsOffline,
    "mnist_captions_offline": MnistCaptionsOffline,
    "numbers_offline": NumbersOffline,
    "speech_commands_offline": SpeechCommandsOffline,
    "spoken_sentences_offline": SpokenSentencesOffline,
}


def local_builder(name: str, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """The local builder for ``name`` or ``name/config`` (not yet prepared).

  Checked here rather than left to TFDS so that a typo in a config name fails
  at once with the choices, for builders with and without configs alike.
  """
  base, _, config = name.partition("/")
  builder_class = LOCAL_BUILDERS[base]
  if not config:
    return builder_class(data_dir=data_dir)
  known = [c.name for c in builder_class.BUILDER_CONFIGS or []]
  if config not in known:
    raise ValueError(f"unknown config {config!r} of {base}; known configs: "
                     f"{', '.join(known) if known else '(none)'}")
  return builder_class(data_dir=data_dir, config=config)


class SplitError(ValueError):
  """A split string the dataset cannot read, in one line."""


def load_split(name: str, split: str, data_dir: Optional[str] = None,
               download: bool = True,
               fixed_lengths: Optional[Dict[str, int]] = None,
               example_map: Optional[Callable] = None) -> Dict[str, np.ndarray]:
  """All examples of one split as numpy arrays, keyed by feature name.

  Args:
    name: a ``LOCAL_BUILDERS`` name or any TFDS dataset name, either with an
      optional builder config after a slash (``listops_offline/smoke``).
    split: a TFDS split string (``train``, ``test``, ``train[:90%]``...).
    data_dir: TFDS data directory; None for TFDS's default.
    download: for online names, allow ``tfds.load`` to download and prepare.
    fixed_lengths: feature -> length for features whose examples differ in
      length (speech clips); each is cut or zero-padded at the end to it, so
      the split stacks into one array.
    example_map: a TensorFlow function applied to each example before the
      split is stacked, for datasets whose examples differ in shape in ways
      ``fixed_lengths`` does not cover (detection: objects per image, image
      sizes; ``scenes.pad_objects``). It must return fixed shapes.
  """
  tfds.disable_progress_bar()
  data_dir = data_dir or None
  batch_size = -1 if not (fixed_lengths or example_map) else None
  try:
    if name.partition("/")[0] in LOCAL_BUILDERS:
      builder = local_builder(name, data_dir)
      builder.download_and_prepare()
      dataset = builder.as_dataset(split=split, batch_size=batch_size)
    else:
      dataset = tfds.load(name, split=split, data_dir=data_dir, batch_size=batch_size,
                          download=download)
  except ValueError as e:
    # TFDS's words for a split it cannot read ("Unknown split 'trian'. Should
    # be one of [...]", "Error parsing split ..."), as one line.
    message = str(e).strip()
    if message.startswith(("Unknown split", "Error parsing split")):
      raise SplitError(f"dataset {name!r}: " + " ".join(message.split())) from None
    raise
  if fixed_lengths:
    dataset = _stack_fixed(dataset, fixed_lengths)
  elif example_map is not None:
    dataset = dataset.map(example_map).batch(1 << 30).get_single_element()
  return _as_arrays(tfds.as_numpy(dataset))


def _as_arrays(features):
  """Numpy arrays keyed as the features, nested features (detection's
  ``objects``) as nested dicts."""
  return {k: _as_arrays(v) if isinstance(v, dict) else np.asarray(v)
          for k, v in features.items()}


def _stack_fixed(dataset, fixed_lengths: Dict[str, int]):
  """One batch of the whole (unbatched) ``dataset``, with the features named in
  ``fixed_lengths`` cut or end-padded with zeros to their length first."""
  import tensorflow as tf

  def fit(example):
    example = dict(example)
    for feature, length in fixed_lengths.items():
      x = example[feature][:length]
      example[feature] = tf.pad(x, [[0, length - tf.shape(x)[0]]])
      example[feature].set_shape([length])
    return example
  missing = set(fixed_lengths) - set(dataset.element_spec)
  if missing:
    raise ValueError(f"fixed_lengths names feature(s) {sorted(missing)} the dataset "
                     f"lacks; it has {sorted(dataset.element_spec)}")
  return dataset.map(fit).batch(1 << 30).get_single_element()
