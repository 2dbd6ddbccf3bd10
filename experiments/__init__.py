"""Experiments: ``experiments/NAME.py`` defines ``get_config() -> ConfigDict``.

Modules whose name starts with ``_`` are shared pieces, not experiments.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import List

import ml_collections


def names() -> List[str]:
  """Available experiment names, sorted."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_"))


def get_config(name: str) -> ml_collections.ConfigDict:
  """The config of experiment ``name``, with ``config.experiment`` set.

  Raises:
    ValueError: unknown name, listing the available experiments.
  """
  if name not in names():
    raise ValueError(
        f"unknown experiment {name!r}; available experiments: {', '.join(names())}")
  config = importlib.import_module(f"experiments.{name}").get_config()
  with config.unlocked():
    config.experiment = name
  return config
