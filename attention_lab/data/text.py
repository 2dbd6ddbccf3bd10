"""Text inputs: ListOps symbols, IMDB reviews as bytes, dates and number
words as characters.

Classification batches hold ``inputs`` int32 ``[batch, max_length]`` (0 =
padding) and ``label`` int32 ``[batch]``. Translation batches hold ``inputs``
``{"source": [batch, source_length], "target": [batch, target_length]}`` and
``label`` = the target ids (``<eos>`` then padding), which the model reads
only for teacher forcing.
"""

from __future__ import annotations

import numpy as np

from attention_lab.data import dates
from attention_lab.data import listops
from attention_lab.data import numbers
from attention_lab.data.builders.numbers_offline import language_of
from attention_lab.data.pipeline import Arrays

# Byte-level text (the Long Range Arena "Text" task): id = byte + 1, 0 = padding.
BYTE_VOCABULARY = ("<pad>",) + tuple(chr(b) for b in range(256))


def _strings(values) -> list:
  """TFDS ``Text`` features come back as bytes objects."""
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _max_length(data_config, name: str) -> int:
  if data_config.max_length <= 0:
    raise ValueError(f"{name}: set config.data.max_length to the tokens per example")
  return data_config.max_length


def listops_inputs(split: Arrays, data_config) -> Arrays:
  """``expression``/``label`` -> token ids ``[n, config.data.max_length]``.

  An expression longer than ``max_length`` is an error rather than truncated:
  cutting a ListOps expression changes its value.
  """
  tokens = listops.tokenize(_strings(split["expression"]),
                            _max_length(data_config, "listops"))
  return {"inputs": tokens, "label": split["label"].astype(np.int32)}


def byte_ids(texts, max_length: int) -> np.ndarray:
  """UTF-8 bytes + 1, truncated or padded to ``max_length``: ``[n, max_length]``."""
  out = np.zeros((len(texts), max_length), np.int32)
  for i, text in enumerate(texts):
    raw = text if isinstance(text, bytes) else str(text).encode("utf-8")
    data = np.frombuffer(raw[:max_length], np.uint8)
    out[i, :len(data)] = data.astype(np.int32) + 1
  return out


def bytes_inputs(split: Arrays, data_config) -> Arrays:
  """``text``/``label`` (``imdb_reviews``) -> byte ids ``[n, max_length]``.

  Reviews longer than ``max_length`` are truncated, as in Long Range Arena.
  """
  return {"inputs": byte_ids(split["text"], _max_length(data_config, "bytes")),
          "label": split["label"].astype(np.int32)}


def dates_inputs(split: Arrays, data_config) -> Arrays:
  """``source``/``target`` date strings -> character ids.

  The source is padded to ``config.data.max_length`` (0: the longest format);
  the target is always ``dates.TARGET_LENGTH`` (ten ISO characters + ``<eos>``).
  """
  source_length = data_config.max_length or dates.MAX_SOURCE_LENGTH
  source = dates.encode(_strings(split["source"]), source_length, add_eos=False)
  target = dates.encode(_strings(split["target"]), dates.TARGET_LENGTH, add_eos=True)
  return {"inputs": {"source": source, "target": target}, "label": target}


def numbers_inputs(split: Arrays, data_config) -> Arrays:
  """``source``/``target`` number words -> character ids.

  The source is padded to ``config.data.max_length`` (0: the longest English
  number); the target to its language's ``numbers.TARGET_LENGTHS`` (the
  longest number + ``<eos>``), the language read from ``config.data.name``.
  """
  source_length = data_config.max_length or numbers.MAX_SOURCE_LENGTH
  target_length = numbers.TARGET_LENGTHS[language_of(data_config.name)]
  source = numbers.encode(_strings(split["source"]), source_length, add_eos=False)
  target = numbers.encode(_strings(split["target"]), target_length, add_eos=True)
  return {"inputs": {"source": source, "target": target}, "label": target}
