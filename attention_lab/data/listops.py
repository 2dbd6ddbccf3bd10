"""ListOps: nested list operations over digits, a seeded generator.

The task of the Long Range Arena (LRA): read an expression such as
``[MAX 2 9 [MIN 4 7 ] 0 ]`` and output its value, a digit. Operators:

- ``MAX``, ``MIN``: the largest / smallest argument;
- ``MED``: the median, ``int(np.median(args))``: with an even count the mean of
  the two middle values truncated toward zero (``[MED 1 2 3 4 ]`` is 2);
- ``SM``: the sum modulo 10.

The tree recipe follows LRA's (depth at most 10, 2 to 10 arguments, a node
below the maximum depth is an operator with probability 0.25, lengths kept
strictly inside a window, duplicates removed) but every draw comes from
``numpy.random.default_rng(seed)``, so a dataset is reproducible from its seed.
Pure Python and numpy: no TensorFlow, so the generator is cheap to test.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np

OPERATORS = ("MAX", "MIN", "MED", "SM")
CLOSE = "]"
DIGITS = tuple(str(d) for d in range(10))
# Index = token id. Id 0 pads, so a padded batch needs no extra mask input.
VOCABULARY = ("<pad>",) + tuple("[" + op for op in OPERATORS) + (CLOSE,) + DIGITS
PAD_ID = 0
TOKEN_IDS = {token: i for i, token in enumerate(VOCABULARY)}
NUM_CLASSES = 10

Seed = Union[int, Sequence[int]]
Example = Tuple[str, int]


def apply(operator: str, args: Sequence[int]) -> int:
  """Value of ``operator`` (a name in ``OPERATORS``) over digit ``args``."""
  if operator == "MAX":
    return max(args)
  if operator == "MIN":
    return min(args)
  if operator == "SM":
    return sum(args) % 10
  if operator == "MED":
    ordered = sorted(args)
    mid = len(ordered) // 2
    if len(ordered) % 2:
      return ordered[mid]
    # Digits are non-negative, so floor division is np.median's value
    # truncated toward zero, without a numpy call per node.
    return (ordered[mid - 1] + ordered[mid]) // 2
  raise ValueError(f"unknown operator {operator!r}; known: {', '.join(OPERATORS)}")


class _TooLong(Exception):
  """Raised inside tree growth once a tree passes the length limit."""


def _uniforms(rng: np.random.Generator, block: int = 1 << 16) -> Callable[[], float]:
  """A function returning the next uniform float in [0, 1) drawn by ``rng``.

  The generator takes several draws per node; one ``Generator.random()`` call
  per draw costs about a microsecond of overhead, so numbers are read in
  blocks through a C-level iterator. Still a pure function of the seed.
  """
  blocks = iter(lambda: rng.random(block).tolist(), None)  # never ends
  return itertools.chain.from_iterable(blocks).__next__


class _Tree:
  """Grows one random expression, its tokens and its value together.

  ``owed`` counts tokens the tree has already committed to: one per argument
  not yet started and one per open bracket not yet closed. ``len(tokens) +
  owed`` is a lower bound on the final length, so a tree that cannot be kept
  stops as soon as the bound reaches the limit instead of growing on: tree
  sizes have a long tail (an operator has 1.5 operator children on average),
  and most of the work goes to trees that are thrown away. Kept trees never stop
  early, so the distribution of kept expressions is unchanged.
  """

  def __init__(self, uniform: Callable[[], float], max_length: int, max_depth: int,
               max_args: int, operator_prob: float):
    self.uniform = uniform
    self.max_length = max_length
    self.max_depth = max_depth
    self.max_args = max_args
    self.operator_prob = operator_prob
    self.tokens: List[str] = []
    self.owed = 1  # the root

  def grow(self) -> int:
    """Grows the whole tree; returns its value."""
    if 1 < self.max_depth and self.uniform() < self.operator_prob:
      return self._operator(1)
    return self._digit()

  def _digit(self) -> int:
    value = int(self.uniform() * 10)
    self.tokens.append(DIGITS[value])
    self.owed -= 1
    return value

  def _operator(self, depth: int) -> int:
    """Appends an operator node at ``depth`` (root = 1) and its subtree.

    Digit children are drawn in the loop rather than by a call per child:
    they are most nodes, and the calls cost about a tenth of the run time.
    """
    uniform, tokens = self.uniform, self.tokens
    operator = OPERATORS[int(uniform() * len(OPERATORS))]
    num_args = 2 + int(uniform() * (self.max_args - 1))
    tokens.append("[" + operator)
    self.owed += num_args  # this node's slot becomes its arguments and "]"
    if len(tokens) + self.owed >= self.max_length:
      raise _TooLong
    children_may_branch = depth + 1 < self.max_depth
    args = []
    for _ in range(num_args):
      if children_may_branch and uniform() < self.operator_prob:
        args.append(self._operator(depth + 1))
      else:
        args.append(self._digit())
    tokens.append(CLOSE)
    self.owed -= 1
    return apply(operator, args)


def generate(num_examples: int, *, seed: Seed, min_length: int, max_length: int,
             max_depth: int = 10, max_args: int = 10, operator_prob: float = 0.25,
             exclude: Iterable[str] = ()) -> List[Example]:
  """``num_examples`` distinct ``(expression, label)`` pairs.

  Trees are drawn until enough have a length (tokens: 2 per operator, 1 per
  digit) with ``min_length < length < max_length``; shorter or longer ones and
  repeats are dropped. Deterministic given the arguments: the first ``k``
  examples are the same whatever ``num_examples >= k`` is.

  Args:
    num_examples: how many examples to return.
    seed: anything ``numpy.random.default_rng`` accepts (an int or ints).
    min_length, max_length: exclusive bounds on the token count.
    max_depth: nodes at this depth (root = 1) are digits.
    max_args: operators take 2 to ``max_args`` arguments.
    operator_prob: probability that a node above ``max_depth`` is an operator.
    exclude: expressions never to return (for example another split's).
  """
  if max_args < 2:
    raise ValueError(f"max_args must be at least 2, got {max_args}")
  if not 0 <= min_length < max_length - 1:
    raise ValueError(f"no length lies strictly between {min_length} and {max_length}")
  uniform = _uniforms(np.random.default_rng(seed))
  seen = set(exclude)
  examples: List[Example] = []
  while len(examples) < num_examples:
    tree = _Tree(uniform, max_length, max_depth, max_args, operator_prob)
    try:
      label = tree.grow()
    except _TooLong:
      continue
    if len(tree.tokens) <= min_length:
      continue
    expression = " ".join(tree.tokens)
    if expression in seen:
      continue
    seen.add(expression)
    examples.append((expression, label))
  return examples


def evaluate(expression: str) -> int:
  """The value (label) of an expression string such as ``[SM 9 9 ]`` (8)."""
  stack: List[list] = []  # open operators: [name, arguments so far]
  value = None
  tokens = expression.split()
  for position, token in enumerate(tokens):
    if token.startswith("["):
      if token[1:] not in OPERATORS:
        raise ValueError(f"unknown operator {token!r} at token {position}")
      stack.append([token[1:], []])
      continue
    if token == CLOSE:
      if not stack:
        raise ValueError(f"unmatched {CLOSE!r} at token {position}")
      operator, args = stack.pop()
      if not args:
        raise ValueError(f"operator {operator} without arguments at token {position}")
      value = apply(operator, args)
    elif token in DIGITS:
      value = int(token)
    else:
      raise ValueError(f"unknown token {token!r} at position {position}")
    if stack:
      stack[-1][1].append(value)
    elif position != len(tokens) - 1:
      raise ValueError(f"tokens after the end of the expression at {position}")
  if stack or value is None:
    raise ValueError(f"incomplete expression {expression!r}")
  return value


def tokenize(expressions: Sequence[str], max_length: int) -> np.ndarray:
  """Token ids ``int32 [num_expressions, max_length]``, padded with ``PAD_ID``.

  Raises ``ValueError`` naming the expression's index when it has more than
  ``max_length`` tokens or a token outside ``VOCABULARY``: truncating would
  change the label silently.
  """
  ids = np.full((len(expressions), max_length), PAD_ID, np.int32)
  for i, expression in enumerate(expressions):
    tokens = expression.split()
    if len(tokens) > max_length:
      raise ValueError(f"expression {i} has {len(tokens)} tokens, more than "
                       f"max_length={max_length}")
    try:
      ids[i, :len(tokens)] = [TOKEN_IDS[t] for t in tokens]
    except KeyError as error:
      raise ValueError(f"expression {i} has unknown token {error.args[0]!r}") from None
  return ids


def detokenize(ids: Sequence[int]) -> str:
  """The expression string of one row of ``tokenize`` (padding dropped)."""
  return " ".join(VOCABULARY[int(i)] for i in ids if int(i) != PAD_ID)


# Held-out splits are drawn first, so their examples stay the same when only
# the training size changes.
SPLIT_ORDER = ("test", "validation", "train")


def make_splits(seed: Seed, sizes: Dict[str, int], min_length: int, max_length: int,
                **options) -> Dict[str, List[Example]]:
  """Disjoint splits: split name -> list of ``(expression, label)``.

  One stream of distinct expressions is cut into ``test``, ``validation``,
  ``train`` (in that order), so no expression is in two splits.

  Args:
    seed: the generator seed.
    sizes: split name -> number of examples; names from ``SPLIT_ORDER``.
    min_length, max_length, options: as for ``generate``.
  """
  unknown = set(sizes) - set(SPLIT_ORDER)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; known: {', '.join(SPLIT_ORDER)}")
  names = [name for name in SPLIT_ORDER if name in sizes]
  examples = generate(sum(sizes[n] for n in names), seed=seed, min_length=min_length,
                      max_length=max_length, **options)
  splits, start = {}, 0
  for name in names:
    splits[name] = examples[start:start + sizes[name]]
    start += sizes[name]
  return splits
