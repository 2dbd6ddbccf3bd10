"""Human-readable dates -> ISO 8601 dates: a character-level translation task.

``"Tuesday, May 5 1998"``, ``"05/05/98"`` or ``"5th of May 1998"`` all become
``"1998-05-05"``. The task is small enough to train in minutes on a CPU, and its
attention maps are easy to read: each output digit should look at the source
characters that carry the day, the month or the year.

Dates run from 1950-01-01 to 2049-12-31 so that a two-digit year is never
ambiguous: ``50``..``99`` mean 1950..1999 and ``00``..``49`` mean 2000..2049
(pivot 50, the convention of POSIX ``strptime`` shifted by 19 years to centre
the range on 2000). Each format is one fixed convention (US month/day order
for slashes with the year last, day.month.year for dots) so the mapping is a
function the model can learn. Month and weekday names are written here rather
than taken from the locale, so the data are the same on every machine.
"""

from __future__ import annotations

import datetime
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from attention_lab.data import characters

FIRST_DATE = datetime.date(1950, 1, 1)
LAST_DATE = datetime.date(2049, 12, 31)
TWO_DIGIT_YEAR_PIVOT = 50  # yy >= 50 -> 19yy, yy < 50 -> 20yy

MONTHS = ("January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December")
MONTH_ABBREVIATIONS = tuple(m[:3] for m in MONTHS)  # "Sep", not "Sept"
# Indexed by ``datetime.date.weekday()``: Monday = 0.
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
            "Sunday")
WEEKDAY_ABBREVIATIONS = tuple(w[:3] for w in WEEKDAYS)


def ordinal_suffix(day: int) -> str:
  """``st``, ``nd``, ``rd`` or ``th``: 1st, 2nd, 3rd, 11th, 12th, 13th, 21st..."""
  if 11 <= day % 100 <= 13:
    return "th"
  return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _month(d: datetime.date) -> str:
  return MONTHS[d.month - 1]


def _mon(d: datetime.date) -> str:
  return MONTH_ABBREVIATIONS[d.month - 1]


# Source formats, named by a pattern (d/dd: day without/with zero padding,
# MM: month number, MMMM/MMM: month name/abbreviation, EEEE/EEE: weekday
# name/abbreviation, yyyy/yy: year) and shown on 1998-05-03, a Sunday.
FORMATS: Tuple[Tuple[str, Callable[[datetime.date], str]], ...] = (
    ("d MMMM yyyy", lambda d: f"{d.day} {_month(d)} {d.year}"),      # 3 May 1998
    ("dd MMMM yyyy", lambda d: f"{d.day:02d} {_month(d)} {d.year}"),  # 03 May 1998
    ("MMMM d, yyyy", lambda d: f"{_month(d)} {d.day}, {d.year}"),     # May 3, 1998
    ("MMMM dd yyyy", lambda d: f"{_month(d)} {d.day:02d} {d.year}"),  # May 03 1998
    ("EEEE, MMMM d yyyy",                                            # Sunday, May 3 1998
     lambda d: f"{WEEKDAYS[d.weekday()]}, {_month(d)} {d.day} {d.year}"),
    ("EEE, d MMM yyyy",                                              # Sun, 3 May 1998
     lambda d: f"{WEEKDAY_ABBREVIATIONS[d.weekday()]}, {d.day} {_mon(d)} {d.year}"),
    ("d'th' of MMMM yyyy",                                           # 3rd of May 1998
     lambda d: f"{d.day}{ordinal_suffix(d.day)} of {_month(d)} {d.year}"),
    ("MMMM d, yyyy (upper case)",                                    # MAY 3, 1998
     lambda d: f"{_month(d).upper()} {d.day}, {d.year}"),
    ("d MMMM yyyy (lower case)",                                     # 3 may 1998
     lambda d: f"{d.day} {_month(d).lower()} {d.year}"),
    ("d MMMM yy", lambda d: f"{d.day} {_month(d)} {d.year % 100:02d}"),    # 3 May 98
    ("MM/dd/yy", lambda d: f"{d.month:02d}/{d.day:02d}/{d.year % 100:02d}"),  # 05/03/98
    ("MM/dd/yyyy", lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}"),   # 05/03/1998
    ("dd.MM.yyyy", lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}"),   # 03.05.1998
    ("yyyy/MM/dd", lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}"),   # 1998/05/03
    ("MMM d, yyyy", lambda d: f"{_mon(d)} {d.day}, {d.year}"),        # May 3, 1998
    ("d MMM yyyy", lambda d: f"{d.day} {_mon(d)} {d.year}"),          # 3 May 1998
)
FORMAT_NAMES = tuple(name for name, _ in FORMATS)

# Index = id. Every character of every format and of ISO targets; a test
# renders every format on every date and checks this set is exactly covered.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHARS = SPECIAL_TOKENS + tuple(
    " ,-./0123456789ABCDEFGHIJLMNOPRSTUVWYabcdefghijlmnoprstuvy")
PAD_ID, BOS_ID, EOS_ID = characters.PAD_ID, characters.BOS_ID, characters.EOS_ID
CHAR_IDS = {c: i for i, c in enumerate(CHARS)}

# Longest source ("Wednesday, September 13 1950", 28 characters) + 1 spare
# position (the source is encoded without <eos>); ISO targets are 10
# characters + <eos>.
MAX_SOURCE_LENGTH = 29
TARGET_LENGTH = 11

Seed = Union[int, Sequence[int]]
Example = Tuple[str, str]


def render(date: datetime.date, format_index: int) -> str:
  """``date`` written in ``FORMATS[format_index]``."""
  return FORMATS[format_index][1](date)


def all_dates() -> List[datetime.date]:
  """Every calendar day from ``FIRST_DATE`` to ``LAST_DATE``, in order."""
  first = FIRST_DATE.toordinal()
  return [datetime.date.fromordinal(o) for o in range(first, LAST_DATE.toordinal() + 1)]


def generate(num_examples: int, *, seed: Seed,
             dates: Optional[Sequence[datetime.date]] = None) -> List[Example]:
  """``num_examples`` pairs ``(source, ISO target)``, deterministic in ``seed``.

  Each example draws a date uniformly from ``dates`` (default: the whole
  range) and a format uniformly from ``FORMATS``; pairs may repeat.
  """
  dates = all_dates() if dates is None else list(dates)
  if num_examples and not dates:
    raise ValueError("no dates to draw from")
  rng = np.random.default_rng(seed)
  day_index = rng.integers(len(dates), size=num_examples) if dates else []
  format_index = rng.integers(len(FORMATS), size=num_examples)
  return [(render(dates[i], f), dates[i].isoformat())
          for i, f in zip(day_index.tolist(), format_index.tolist())]


# Held-out splits come first; each split's examples use their own seed stream.
SPLIT_ORDER = ("test", "validation", "train")


def _check_sizes(sizes: Dict[str, int]) -> List[str]:
  unknown = set(sizes) - set(SPLIT_ORDER)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; known: {', '.join(SPLIT_ORDER)}")
  if any(n < 0 for n in sizes.values()):
    raise ValueError(f"split sizes must not be negative: {sizes}")
  return [name for name in SPLIT_ORDER if name in sizes]


def split_dates(seed: Seed, sizes: Dict[str, int]) -> Dict[str, List[datetime.date]]:
  """Partitions the calendar days of the range among the splits.

  Held-out examples are then unseen dates, not just unseen strings of seen
  dates: a model cannot pass the test by remembering a date it met in another
  format. Each split gets a share of the days proportional to its number of
  examples (at least one day when it has examples); the days are a seeded
  random choice, each split's list sorted.

  Args:
    seed: partition seed.
    sizes: split name (from ``SPLIT_ORDER``) -> number of examples.
  """
  names = _check_sizes(sizes)
  days = all_dates()
  order = np.random.default_rng(seed).permutation(len(days))
  total = sum(sizes[n] for n in names)
  if total == 0:
    raise ValueError("all split sizes are zero")
  counts = {n: (max(1, len(days) * sizes[n] // total) if sizes[n] else 0)
            for n in names}
  # Rounding leftovers go to train (or the last split when there is none).
  receiver = "train" if "train" in names else names[-1]
  counts[receiver] += len(days) - sum(counts.values())
  splits, start = {}, 0
  for name in names:
    splits[name] = [days[i] for i in sorted(order[start:start + counts[name]].tolist())]
    start += counts[name]
  return splits


def make_splits(seed: Seed, sizes: Dict[str, int]) -> Dict[str, List[Example]]:
  """Split name -> ``(source, target)`` pairs, each split on its own days.

  Args:
    seed: an int; the day partition uses it and split ``k`` of ``SPLIT_ORDER``
      draws its examples from ``default_rng([seed, k])``.
    sizes: split name -> number of examples.
  """
  days = split_dates(seed, sizes)
  return {name: generate(sizes[name], seed=[seed, SPLIT_ORDER.index(name)],
                         dates=days[name])
          for name in days}


def encode(texts: Sequence[str], max_length: int, *, add_eos: bool) -> np.ndarray:
  """``characters.encode`` over this corpus's ``CHARS``: ``int32 [len(texts),
  max_length]``; a text that does not fit or has a foreign character is a
  ``ValueError`` naming it."""
  return characters.encode(texts, max_length, CHAR_IDS, add_eos=add_eos)


def decode(ids: Sequence[int]) -> str:
  """``characters.decode`` over this corpus's ``CHARS``: the text up to the
  first ``<eos>``."""
  return characters.decode(ids, CHARS)
