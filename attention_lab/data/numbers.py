"""Numbers in English words -> German or French words: translation whose
alignment crosses.

``342``: ``"three hundred and forty-two"`` -> ``"dreihundertzweiundvierzig"``
(German writes the units before the tens, so the output's ``zwei`` looks at
the source's ``two`` at the end and ``vierzig`` then looks back at ``forty``)
or ``"trois cent quarante-deux"`` (French counts in twenties from 70:
``quatre-vingt-dix-neuf`` is 4 x 20 + 10 + 9). Character level.

The words come from the ``num2words`` package (its English, German and French
rules, well kept and tested, rather than grammar written here). Each split
holds distinct numbers, and a held-out split's numbers never occur in
training: a model passes only by composing the parts it learned.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from num2words import num2words

from attention_lab.data import characters

SOURCE_LANGUAGE = "en"
LANGUAGES = ("de", "fr")           # target languages
LARGEST_NUMBER = 99_999            # numbers run from 0 to this

# Index = id. Every character num2words writes for 0..999,999 in English,
# German and French (a test checks a sample and the longest numbers).
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHARS = SPECIAL_TOKENS + tuple(" ,-abcdefghilmnopqrstuvwxyzßéöü")
PAD_ID, BOS_ID, EOS_ID = characters.PAD_ID, characters.BOS_ID, characters.EOS_ID
CHAR_IDS = {c: i for i, c in enumerate(CHARS)}

# Longest source below 100,000: 73,373 "seventy-three thousand, three hundred
# and seventy-three" (55 characters; the source has no <eos>) + 1 spare.
MAX_SOURCE_LENGTH = 56
# Longest target + <eos>: German 27,727 (52 characters), French 94,494 (61).
TARGET_LENGTHS = {"de": 53, "fr": 62}

Seed = Union[int, Sequence[int]]
Example = Tuple[str, str, int]     # (English words, target words, the number)

# Held-out splits first, as in ``dates``.
SPLIT_ORDER = ("test", "validation", "train")


def check_language(language: str) -> str:
  if language not in LANGUAGES:
    raise ValueError(f"unknown target language {language!r}; known: {', '.join(LANGUAGES)}")
  return language


def words(number: int, language: str) -> str:
  """``number`` written out in ``language`` (``en``, ``de`` or ``fr``)."""
  if language != SOURCE_LANGUAGE:
    check_language(language)
  if not 0 <= number <= LARGEST_NUMBER:
    raise ValueError(f"number {number} is outside 0..{LARGEST_NUMBER:,}")
  return num2words(int(number), lang=language)


def split_numbers(seed: Seed, sizes: Dict[str, int],
                  largest: int = LARGEST_NUMBER) -> Dict[str, List[int]]:
  """Disjoint sets of distinct numbers from ``0..largest``, one per split.

  Args:
    seed: the draw's seed (one permutation of the range, cut in order of
      ``SPLIT_ORDER``).
    sizes: split name -> how many numbers; together at most ``largest + 1``.
    largest: the largest number drawn.

  Returns:
    split name -> its numbers, sorted.
  """
  unknown = set(sizes) - set(SPLIT_ORDER)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; known: {', '.join(SPLIT_ORDER)}")
  if any(n < 0 for n in sizes.values()):
    raise ValueError(f"split sizes must not be negative: {sizes}")
  if not 0 <= largest <= LARGEST_NUMBER:
    raise ValueError(f"largest number {largest} is outside 0..{LARGEST_NUMBER:,}")
  total = sum(sizes.values())
  if total > largest + 1:
    raise ValueError(f"splits ask for {total:,} distinct numbers but 0..{largest:,} "
                     f"has only {largest + 1:,}")
  order = np.random.default_rng(seed).permutation(largest + 1)
  splits, start = {}, 0
  for name in (n for n in SPLIT_ORDER if n in sizes):
    splits[name] = sorted(order[start:start + sizes[name]].tolist())
    start += sizes[name]
  return splits


def make_splits(seed: Seed, sizes: Dict[str, int], language: str,
                largest: int = LARGEST_NUMBER) -> Dict[str, List[Example]]:
  """Split name -> ``(English, target language, number)`` triples, each
  split in a seeded random order (``default_rng([seed, k])`` for split ``k``
  of ``SPLIT_ORDER``) so that training batches mix small and large numbers."""
  check_language(language)
  splits = {}
  for name, numbers in split_numbers(seed, sizes, largest).items():
    order = np.random.default_rng([seed, SPLIT_ORDER.index(name)]).permutation(len(numbers))
    splits[name] = [(words(numbers[i], SOURCE_LANGUAGE), words(numbers[i], language),
                     numbers[i]) for i in order.tolist()]
  return splits


def encode(texts: Sequence[str], max_length: int, *, add_eos: bool) -> np.ndarray:
  """``characters.encode`` over this corpus's ``CHARS``: ``int32 [len(texts),
  max_length]``; a text that does not fit or has a foreign character is a
  ``ValueError`` naming it."""
  return characters.encode(texts, max_length, CHAR_IDS, add_eos=add_eos)


def decode(ids: Sequence[int]) -> str:
  """``characters.decode`` over this corpus's ``CHARS``: the text up to the
  first ``<eos>``."""
  return characters.decode(ids, CHARS)
