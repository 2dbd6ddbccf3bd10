"""Image classification inputs: scaling and shift augmentation.

Batches hold ``inputs`` float32 ``[batch, height, width, channels]`` in [0, 1]
and ``label`` int32 ``[batch]``.
"""

from __future__ import annotations

import numpy as np

from attention_lab.data.pipeline import Arrays


def to_model_inputs(split: Arrays) -> Arrays:
  """TFDS ``image``/``label`` features -> ``inputs``/``label`` arrays."""
  return {
      "inputs": split["image"].astype(np.float32) / 255.0,
      "label": split["label"].astype(np.int32),
  }


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
