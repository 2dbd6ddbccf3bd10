"""Dates to ISO 8601 with Luong (multiplicative) attention and input feeding.

Command: python run.py --experiment=dates_luong --workdir=runs/dates_luong
Same data and budget as ``dates_bahdanau``; ``--config.model.score``
picks ``luong_general`` (``s W h``, the default) or ``luong_dot`` (``s . h``).
Target: at least 99% exact match on unseen test dates within 15 minutes.
"""

from experiments import dates_bahdanau


def get_config():
  config = dates_bahdanau.get_config()
  config.model.score = "luong_general"
  return config
