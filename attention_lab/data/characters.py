"""Character-level sequences for the translation tasks (dates, number words).

A vocabulary is a tuple of characters after three special tokens (``<pad>``
0, ``<bos>`` 1, ``<eos>`` 2); each task keeps its own characters and binds
``encode`` / ``decode`` to them.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def encode(texts: Sequence[str], max_length: int, char_ids: Dict[str, int], *,
           add_eos: bool) -> np.ndarray:
  """Character ids ``int32 [len(texts), max_length]``, padded with ``PAD_ID``.

  With ``add_eos`` an ``<eos>`` follows the characters (targets: the decoder
  learns where to stop). A text that does not fit, or has a character outside
  the vocabulary, is a ``ValueError`` naming it: silently cutting a text
  changes its meaning.
  """
  ids = np.full((len(texts), max_length), PAD_ID, np.int32)
  for row, text in enumerate(texts):
    try:
      codes = [char_ids[c] for c in text]
    except KeyError as error:
      raise ValueError(f"text {text!r} has character {error.args[0]!r} outside CHARS") from None
    if add_eos:
      codes.append(EOS_ID)
    if len(codes) > max_length:
      raise ValueError(f"text {text!r} needs {len(codes)} ids"
                       f"{' with <eos>' if add_eos else ''}, more than max_length={max_length}")
    ids[row, :len(codes)] = codes
  return ids


def decode(ids: Sequence[int], chars: Sequence[str]) -> str:
  """The text of one row of ids: characters up to the first ``<eos>``.

  ``<bos>`` and padding are skipped, so a decoder's output (which may start
  with ``<bos>`` and run on after ``<eos>``) decodes as its answer.
  """
  out = []
  for i in np.asarray(ids).tolist():
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      out.append(chars[i])
  return "".join(out)
