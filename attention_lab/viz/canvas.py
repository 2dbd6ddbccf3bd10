"""Matplotlib set-up shared by the drawing modules: files only, no display.

Every drawing function writes a PNG and returns ``{path: rgb uint8 array}``
(``Pictures``) so the same picture can also go to TensorBoard; HTML pages
(coloured tokens) are entered as ``{path: None}``.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

import matplotlib
matplotlib.use("Agg")  # servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

Pictures = Dict[str, Optional[np.ndarray]]


def save(fig, path: str) -> Pictures:
  """Writes ``fig`` to ``path`` (folders created), closes it, returns its pixels."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  fig.savefig(path, dpi=fig.dpi)
  plt.close(fig)
  return {path: image}


__all__ = ["Pictures", "plt", "save"]
