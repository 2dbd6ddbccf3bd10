"""Speech inputs: one-second int16 clips, and time-shift augmentation.

Batches hold ``inputs`` int16 ``[batch, 16000]`` (the models' front end turns
them into log-mel spectrograms, so the pipeline keeps the compact raw form)
and ``label`` int32 ``[batch]``.
"""

from __future__ import annotations

import numpy as np

from attention_lab.data.pipeline import Arrays
from attention_lab.data.synthetic_speech_commands import CLIP_SAMPLES
from attention_lab.data.synthetic_speech_commands import LABELS  # TFDS speech_commands' names too
from attention_lab.data.synthetic_speech_commands import SAMPLE_RATE

# TFDS speech_commands clips run up to one second; shorter ones are padded
# with silence at the end (before batching: the split is ragged on disk).
FIXED_LENGTHS = {"audio": CLIP_SAMPLES}


def speech_inputs(split: Arrays, data_config=None) -> Arrays:
  """TFDS ``audio``/``label`` -> ``inputs`` int16 ``[n, 16000]``/``label``."""
  del data_config
  audio = np.asarray(split["audio"])
  if audio.ndim != 2 or audio.shape[1] != CLIP_SAMPLES:
    raise ValueError(f"speech_inputs expects audio [n, {CLIP_SAMPLES}] (one second at "
                     f"{SAMPLE_RATE} Hz), got {audio.shape}")
  return {"inputs": audio.astype(np.int16), "label": split["label"].astype(np.int32)}


def random_time_shift(max_shift: int):
  """Augmentation: move each clip by up to ``max_shift`` samples either way,
  filling with silence, so a word's position in the second is not a cue."""
  def transform(batch: Arrays, rng: np.random.Generator) -> Arrays:
    clips = batch["inputs"]
    n, samples = clips.shape
    shifts = rng.integers(-max_shift, max_shift + 1, size=n)
    source = np.arange(samples)[None, :] - shifts[:, None]         # [n, samples]
    inside = (source >= 0) & (source < samples)
    shifted = np.where(inside, clips[np.arange(n)[:, None], np.clip(source, 0, samples - 1)], 0)
    return {**batch, "inputs": shifted.astype(clips.dtype)}
  return transform


def augmentation(data_config):
  """Time shift by ``config.data.augment_shift`` samples, or None."""
  if data_config.augment_shift <= 0:
    return None
  return random_time_shift(data_config.augment_shift)
