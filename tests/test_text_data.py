"""Offline text data: the ListOps and dates generators and their TFDS builders.

Labels and targets are checked against evaluators written here, independent of
the code under test: a regex reduction for ListOps, a parser and Zeller's
congruence for dates.
"""

from __future__ import annotations

import collections
import datetime
import re
import statistics

import numpy as np
import pytest

from attention_lab.data import dates
from attention_lab.data import listops
from attention_lab.data import sources

# ---------------------------------------------------------------------------
# ListOps

_INNERMOST = re.compile(r"\[(MAX|MIN|MED|SM)((?: \d)+) \]")
_REFERENCE_OPS = {
    "MAX": max,
    "MIN": min,
    "MED": lambda args: int(statistics.median(args)),  # mean of the middle two, truncated
    "SM": lambda args: sum(args) % 10,
}


def reference_value(expression: str) -> int:
  """Reduces innermost brackets to their digit until one digit is left."""
  while True:
    reduced = _INNERMOST.sub(
        lambda m: str(_REFERENCE_OPS[m.group(1)]([int(a) for a in m.group(2).split()])),
        expression)
    if reduced == expression:
      break
    expression = reduced
  assert re.fullmatch(r"\d", expression), f"did not reduce to a digit: {expression!r}"
  return int(expression)


def shape_of(expression: str):
  """``(depth, argument counts)`` of an expression, root depth 1."""
  depth, deepest, counts, stack = 0, 0, [], []
  for token in expression.split(" "):
    if token.startswith("["):
      if stack:
        stack[-1] += 1
      stack.append(0)
      depth += 1
    elif token == "]":
      counts.append(stack.pop())
      depth -= 1
    else:
      if stack:
        stack[-1] += 1
      deepest = max(deepest, depth + 1)
    deepest = max(deepest, depth)
  assert not stack
  return deepest, counts


@pytest.mark.parametrize("expression, value", [
    ("7", 7),
    ("[SM 9 9 ]", 8),
    ("[MED 1 2 3 4 ]", 2),
    ("[MED 1 9 ]", 5),
    ("[MED 0 1 ]", 0),
    ("[MED 3 1 2 ]", 2),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 5 [MAX 1 2 ] ]", 2),
    ("[SM [MED 8 9 ] [SM 5 5 5 ] 1 ]", 4),
])
def test_listops_hand_written_values(expression, value):
  assert listops.evaluate(expression) == value
  assert reference_value(expression) == value


def test_listops_median_truncates_like_numpy():
  rng = np.random.default_rng(0)
  for _ in range(500):
    args = rng.integers(0, 10, size=rng.integers(2, 11)).tolist()
    assert listops.apply("MED", args) == int(np.median(args))


def test_listops_vocabulary_layout():
  assert listops.VOCABULARY[listops.PAD_ID] == "<pad>" and listops.PAD_ID == 0
  assert listops.VOCABULARY[1:6] == ("[MAX", "[MIN", "[MED", "[SM", "]")
  assert listops.VOCABULARY[6:] == tuple("0123456789")


def test_listops_labels_match_an_independent_evaluator():
  examples = listops.generate(300, seed=1, min_length=16, max_length=200)
  for expression, label in examples:
    assert 0 <= label <= 9
    assert reference_value(expression) == label, expression
    assert listops.evaluate(expression) == label


def test_listops_is_deterministic_and_seed_dependent():
  kwargs = dict(min_length=16, max_length=64)
  a = listops.generate(50, seed=3, **kwargs)
  assert a == listops.generate(50, seed=3, **kwargs)
  assert a[:20] == listops.generate(20, seed=3, **kwargs)  # a prefix of the stream
  assert a != listops.generate(50, seed=4, **kwargs)


def test_listops_lengths_are_strict_shapes_bounded_and_no_duplicates():
  examples = listops.generate(400, seed=0, min_length=20, max_length=40,
                              max_depth=4, max_args=5)
  lengths = [len(e.split(" ")) for e, _ in examples]
  assert min(lengths) == 21 and max(lengths) == 39  # both ends reached, never passed
  assert len({e for e, _ in examples}) == len(examples)
  for expression, _ in examples:
    assert "  " not in expression and expression == expression.strip()
    depth, counts = shape_of(expression)
    assert depth <= 4
    assert all(2 <= c <= 5 for c in counts)


def test_listops_exclude_and_disjoint_splits():
  first = listops.generate(40, seed=0, min_length=16, max_length=64)
  excluded = {e for e, _ in first[:10]}
  again = listops.generate(40, seed=0, min_length=16, max_length=64, exclude=excluded)
  assert not excluded & {e for e, _ in again}

  sizes = {"train": 200, "validation": 50, "test": 50}
  splits = listops.make_splits(7, sizes, min_length=16, max_length=64)
  assert {k: len(v) for k, v in splits.items()} == sizes
  sets = {k: {e for e, _ in v} for k, v in splits.items()}
  assert not sets["train"] & sets["validation"]
  assert not sets["train"] & sets["test"]
  assert not sets["validation"] & sets["test"]
  # Held-out splits do not move when only the training size changes.
  smaller = listops.make_splits(7, dict(sizes, train=20), min_length=16, max_length=64)
  assert smaller["test"] == splits["test"] and smaller["validation"] == splits["validation"]
  with pytest.raises(ValueError, match="unknown splits"):
    listops.make_splits(7, {"dev": 3}, min_length=16, max_length=64)


def test_listops_tokenize_round_trips_and_rejects_long_expressions():
  expressions = ["[MAX 2 9 [MIN 4 7 ] 0 ]", "5"]
  ids = listops.tokenize(expressions, 12)
  assert ids.shape == (2, 12) and ids.dtype == np.int32
  assert ids[0, :3].tolist() == [1, 8, 15]  # "[MAX", "2", "9"
  assert np.all(ids[0, 9:] == 0) and np.all(ids[1, 1:] == 0)
  assert [listops.detokenize(row) for row in ids] == expressions
  with pytest.raises(ValueError, match=r"expression 0 has 9 tokens, more than max_length=8"):
    listops.tokenize(expressions, 8)
  with pytest.raises(ValueError, match=r"expression 1 has unknown token '\[AVG'"):
    listops.tokenize(["1", "[AVG 1 2 ]"], 8)


# ---------------------------------------------------------------------------
# Dates

_MONTH_NAMES = ["january", "february", "march", "april", "may", "june", "july",
                "august", "september", "october", "november", "december"]
_WEEKDAY_NAMES = ["monday", "tuesday", "wednesday", "thursday", "friday",
                  "saturday", "sunday"]
_SUFFIX = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}


def zeller_weekday(year: int, month: int, day: int) -> int:
  """Monday = 0, by Zeller's congruence (no datetime)."""
  if month < 3:
    month, year = month + 12, year - 1
  k, j = year % 100, year // 100
  h = (day + 13 * (month + 1) // 5 + k + k // 4 + j // 4 + 5 * j) % 7  # 0 = Saturday
  return (h + 5) % 7


def _word_index(word: str, names) -> int:
  """Index of a full name or its three-letter abbreviation, in one case style."""
  assert word in (word.lower(), word.upper(), word.capitalize()), word
  lowered = word.lower()
  matches = [i for i, n in enumerate(names) if lowered in (n, n[:3])]
  assert len(matches) == 1, word
  return matches[0]


def parse_source(source: str) -> datetime.date:
  """The date a source string names, checking weekday and ordinal suffixes."""
  weekday = None
  if "/" in source:
    parts = source.split("/")
    if len(parts[0]) == 4:
      year, month, day = parts
    else:
      month, day, year = parts  # US order
      assert len(month) == len(day) == 2
  elif "." in source:
    day, month, year = source.split(".")
  else:
    numbers = re.findall(r"\d+", source)
    assert len(numbers) == 2, source
    day, year = numbers  # every named-month format puts the day first
    month = None
    for word in re.findall(r"[A-Za-z]+", source):
      if word in ("st", "nd", "rd", "th"):
        assert re.search(rf"\b{int(day)}{word} of ", source), source
        assert word == _SUFFIX.get(int(day), "th"), source
      elif word == "of":
        continue
      elif word.lower() in _WEEKDAY_NAMES + [w[:3] for w in _WEEKDAY_NAMES]:
        weekday = _word_index(word, _WEEKDAY_NAMES)
      else:
        month = _word_index(word, _MONTH_NAMES) + 1
    assert month is not None, source
  if len(year) == 2:
    year = ("19" if int(year) >= 50 else "20") + year  # the documented pivot
  parsed = datetime.date(int(year), int(month), int(day))
  if weekday is not None:
    assert weekday == zeller_weekday(parsed.year, parsed.month, parsed.day), source
  return parsed


def test_dates_formats_on_known_days():
  expected = [
      "3 May 1998", "03 May 1998", "May 3, 1998", "May 03 1998", "Sunday, May 3 1998",
      "Sun, 3 May 1998", "3rd of May 1998", "MAY 3, 1998", "3 may 1998", "3 May 98",
      "05/03/98", "05/03/1998", "03.05.1998", "1998/05/03", "May 3, 1998", "3 May 1998"]
  day = datetime.date(1998, 5, 3)
  assert [dates.render(day, f) for f in range(len(dates.FORMATS))] == expected
  assert len(dates.FORMATS) >= 14
  other = datetime.date(2005, 3, 22)  # a Tuesday
  rendered = {dates.render(other, f) for f in range(len(dates.FORMATS))}
  assert {"Tuesday, March 22 2005", "Tue, 22 Mar 2005", "22nd of March 2005",
          "03/22/05", "22 March 05", "Mar 22, 2005", "22.03.2005"} <= rendered
  for day_of_month, suffix in [(1, "st"), (2, "nd"), (3, "rd"), (4, "th"), (11, "th"),
                               (12, "th"), (13, "th"), (21, "st"), (22, "nd"),
                               (23, "rd"), (30, "th"), (31, "st")]:
    assert dates.ordinal_suffix(day_of_month) == suffix


def test_dates_targets_match_an_independent_parser():
  examples = dates.generate(2000, seed=0)
  for source, target in examples:
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", target)
    assert parse_source(source) == datetime.date.fromisoformat(target), source
  # Every format is drawn (a source may fit several formats when names coincide).
  used = set()
  for source, target in examples:
    day = datetime.date.fromisoformat(target)
    used |= {f for f in range(len(dates.FORMATS)) if dates.render(day, f) == source}
  assert used == set(range(len(dates.FORMATS)))
  years = {int(t[:4]) for _, t in examples}
  assert min(years) >= 1950 and max(years) <= 2049


def test_dates_weekdays_are_true_on_every_day_of_a_year():
  for day in dates.all_dates()[:366]:
    for f, (name, _) in enumerate(dates.FORMATS):
      if name.startswith("EEE"):
        weekday = dates.render(day, f).split(",")[0].lower()
        assert _WEEKDAY_NAMES[zeller_weekday(day.year, day.month, day.day)].startswith(weekday)


def test_dates_are_deterministic_and_seed_dependent():
  assert dates.generate(100, seed=5) == dates.generate(100, seed=5)
  assert dates.generate(100, seed=5) != dates.generate(100, seed=6)
  assert dates.make_splits(1, {"train": 30, "test": 10}) == dates.make_splits(
      1, {"train": 30, "test": 10})


def test_dates_splits_use_disjoint_days():
  sizes = {"train": 400, "validation": 50, "test": 100}
  days = dates.split_dates(3, sizes)
  all_days = dates.all_dates()
  assert sum(len(v) for v in days.values()) == len(all_days) == 36525
  assert set().union(*map(set, days.values())) == set(all_days)
  assert len(days["test"]) == len(all_days) * 100 // 550
  sets = {k: set(v) for k, v in days.items()}
  assert not sets["train"] & sets["test"] and not sets["train"] & sets["validation"]
  assert not sets["validation"] & sets["test"]

  splits = dates.make_splits(3, sizes)
  assert {k: len(v) for k, v in splits.items()} == sizes
  for name, examples in splits.items():
    assert {datetime.date.fromisoformat(t) for _, t in examples} <= sets[name]


def test_dates_chars_cover_exactly_every_string():
  seen, longest = set(), 0
  for day in dates.all_dates():
    seen.update(day.isoformat())
    for f in range(len(dates.FORMATS)):
      source = dates.render(day, f)
      seen.update(source)
      longest = max(longest, len(source))
  assert dates.CHARS[:3] == ("<pad>", "<bos>", "<eos>")
  assert (dates.PAD_ID, dates.BOS_ID, dates.EOS_ID) == (0, 1, 2)
  assert list(dates.CHARS[3:]) == sorted(seen)
  assert dates.MAX_SOURCE_LENGTH == longest + 1
  assert dates.TARGET_LENGTH == len("1998-05-03") + 1


def test_dates_encode_decode():
  texts = ["May 3, 1998", "1998-05-03"]
  ids = dates.encode(texts, dates.MAX_SOURCE_LENGTH, add_eos=True)
  assert ids.shape == (2, dates.MAX_SOURCE_LENGTH) and ids.dtype == np.int32
  assert ids[1, 10] == dates.EOS_ID and np.all(ids[1, 11:] == dates.PAD_ID)
  assert [dates.decode(row) for row in ids] == texts
  no_eos = dates.encode(texts, 11, add_eos=False)
  assert no_eos[1, 10] == dates.PAD_ID and dates.decode(no_eos[1]) == texts[1]
  # A decoder's output: <bos> first, and anything after <eos> is ignored.
  row = [dates.BOS_ID] + dates.encode(["2001"], 5, add_eos=True)[0].tolist() + [
      dates.CHAR_IDS["9"], dates.CHAR_IDS["9"]]
  assert dates.decode(row) == "2001"
  with pytest.raises(ValueError, match=r"'1998-05-03' needs 11 ids with <eos>"):
    dates.encode(texts[1:], 10, add_eos=True)
  with pytest.raises(ValueError, match=r"'May 3rd!' has character '!'"):
    dates.encode(["May 3rd!"], 20, add_eos=False)


# ---------------------------------------------------------------------------
# TFDS builders


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The smoke configs prepared twice, in two fresh data directories."""
  out = []
  for attempt in range(2):
    path = str(tmp_path_factory.mktemp(f"text_tfds{attempt}"))
    listops_splits = {s: sources.load_split("listops_offline/smoke", s, path)
                      for s in ("train", "validation", "test")}
    dates_splits = {s: sources.load_split("dates_offline/smoke", s, path)
                    for s in ("train", "test")}
    out.append((listops_splits, dates_splits))
  return out


def _strings(values):
  return [v.decode("utf-8") for v in values]


def test_listops_builder_smoke(prepared):
  splits, _ = prepared[0]
  assert {k: len(v["label"]) for k, v in splits.items()} == {
      "train": 512, "validation": 128, "test": 128}
  train = splits["train"]
  assert set(train) == {"expression", "label", "length"}
  assert train["length"].dtype == np.int32
  expressions = _strings(train["expression"])
  assert [len(e.split(" ")) for e in expressions] == train["length"].tolist()
  assert np.all((train["length"] > 16) & (train["length"] < 64))
  assert [reference_value(e) for e in expressions] == train["label"].tolist()
  # More than one class, or the task would be trivial.
  assert len(collections.Counter(train["label"].tolist())) >= 5
  sets = {k: set(_strings(v["expression"])) for k, v in splits.items()}
  assert not sets["train"] & sets["test"] and not sets["validation"] & sets["test"]
  assert not sets["train"] & sets["validation"]


def test_dates_builder_smoke(prepared):
  _, splits = prepared[0]
  assert len(splits["test"]["source"]) == 64 and len(splits["train"]["source"]) == 256
  assert set(splits["test"]) == {"source", "target"}
  for source, target in zip(_strings(splits["test"]["source"]),
                            _strings(splits["test"]["target"])):
    assert parse_source(source) == datetime.date.fromisoformat(target)
  train_days = set(_strings(splits["train"]["target"]))
  assert not train_days & set(_strings(splits["test"]["target"]))


def test_builders_are_deterministic_across_directories(prepared):
  (listops_a, dates_a), (listops_b, dates_b) = prepared
  for a, b in [(listops_a, listops_b), (dates_a, dates_b)]:
    for split in a:
      for feature in a[split]:
        np.testing.assert_array_equal(a[split][feature], b[split][feature])


def test_unknown_builder_config_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown config 'huge' of listops_offline; "
                                       "known configs: short, lra, smoke"):
    sources.load_split("listops_offline/huge", "train", str(tmp_path))
  with pytest.raises(ValueError, match="known configs: default, smoke"):
    sources.load_split("dates_offline/nope", "train", str(tmp_path))
