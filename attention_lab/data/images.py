"""Image classification inputs: scaling, grey-scale, shift and flip augmentation.

Batches hold ``inputs`` float32 ``[batch, height, width, channels]`` in [0, 1]
and ``label`` int32 ``[batch]``.
"""

from __future__ import annotations

import numpy as np

from attention_lab.data.pipeline import Arrays


def to_model_inputs(split: Arrays, data_config=None) -> Arrays:
  """TFDS ``image``/``label`` features -> ``inputs``/``label`` arrays."""
  del data_config  # images need no per-experiment shaping here
  return {
      "inputs": split["image"].astype(np.float32) / 255.0,
      "label": split["label"].astype(np.int32),
  }


def to_grayscale(arrays: Arrays) -> Arrays:
  """RGB ``inputs`` -> one luminance channel (ITU-R 601 weights); grey stays grey.

  The Long Range Arena image task reads CIFAR-10 this way, one token per pixel.
  """
  images = arrays["inputs"]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"to_grayscale expects [n, height, width, 1 or 3], got {images.shape}")
  if images.shape[-1] == 3:
    luma = np.asarray([0.299, 0.587, 0.114], np.float32)
    images = (images @ luma)[..., None].astype(np.float32)
  return {**arrays, "inputs": images}


def random_shift(max_shift: int):
  """Augmentation: translate each image by up to ``max_shift`` pixels, zero fill.

  Small translations are the one augmentation that keeps a digit a digit;
  they give a ViT some of the translation invariance it lacks by design.
  """
  def transform(batch: Arrays, rng: np.random.Generator) -> Arrays:
    if max_shift <= 0:
      return batch
    images = batch["inputs"]
    n, h, w, _ = images.shape
    m = max_shift
    padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    dy = rng.integers(0, 2 * m + 1, size=n)
    dx = rng.integers(0, 2 * m + 1, size=n)
    rows = dy[:, None] + np.arange(h)[None, :]                 # [n, h]
    cols = dx[:, None] + np.arange(w)[None, :]                 # [n, w]
    shifted = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return {**batch, "inputs": shifted}
  return transform


def random_flip():
  """Augmentation: mirror half of the images left to right (natural images
  only; a mirrored digit is a different symbol)."""
  def transform(batch: Arrays, rng: np.random.Generator) -> Arrays:
    images = batch["inputs"]
    flip = rng.random(len(images)) < 0.5
    return {**batch, "inputs": np.where(flip[:, None, None, None], images[:, :, ::-1], images)}
  return transform


def augmentation(data_config):
  """The training transform ``config.data`` asks for (shift, then flip), or None."""
  transforms = []
  if data_config.augment_shift > 0:
    transforms.append(random_shift(data_config.augment_shift))
  if data_config.augment_flip:
    transforms.append(random_flip())
  if not transforms:
    return None

  def transform(batch: Arrays, rng: np.random.Generator) -> Arrays:
    for t in transforms:
      batch = t(batch, rng)
    return batch
  return transform
