"""``score_mod`` / ``mask_mod``: attention variants as two small JAX functions.

The FlexAttention convention (PyTorch), in JAX::

    score_mod(score, batch_idx, head_idx, q_idx, kv_idx) -> score
    mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool      # True = attend

Pass them to ``kernels.dot_product_attention(..., score_mod=f, mask_mod=g)``.

**What a mod receives.** ``score`` is the float32 (float64 under x64 with
float64 inputs) logit ``q . k * scale + bias`` of a grid of (query, key)
pairs, shaped ``[batch, heads, Q, K]``; the indices are int32 arrays that
broadcast against it: ``batch_idx [batch, 1, 1, 1]``, ``head_idx
[1, heads, 1, 1]``, ``q_idx [1, 1, Q, 1]``, ``kv_idx [1, 1, 1, K]``
(``masks.mod_index_grid``). ``batch`` counts all leading batch dims
flattened row-major; ``head_idx`` is the *query* head (grouped K/V heads
included). ``reference`` calls a mod once on the whole score matrix;
``blockwise`` calls it on each ``[batch, heads, block_q, block_k]`` block with
the blocks' global positions (padded positions are clamped to the last valid
one, and masked afterwards). So a mod must act elementwise: broadcasting
arithmetic, ``jnp.where``, and gathers indexed by these arrays
(``slopes[head_idx]``, ``doc_ids[batch_idx, q_idx]``). It may return any
shape that broadcasts to the score's (a ``mask_mod`` that ignores the batch
and head gives ``[1, 1, Q, K]``).

**Order.** ``score_mod`` sees the scaled and biased logit; then ``mask``,
``mask_mod``, causal, window and lengths hide keys. A key hidden by a
``-inf`` bias stays hidden whatever the ``score_mod`` returns for it. A
``score_mod`` may itself return ``-inf`` to hide a key; a query left with no
visible key returns zeros, as everywhere.

**Closures.** A mod may close over arrays, learned ones included (ALiBi
slopes, a relative-bias table): gradients reach them under ``jax.grad``.
Kernels with a custom backward hoist them into explicit arguments
(``hoist``) and return their cotangents. A ``mask_mod`` that reads only
indices and concrete arrays gets a static block mask (empty blocks skipped,
full blocks unmasked, ``masks.block_mask``); one that reads a traced array
(document ids passed into ``jit``) is evaluated in every block instead.

The library below builds the common ones; ``get(name)`` finds a factory by the
name a config uses, and ``register`` adds your own.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from attention_lab.kernels import fused_mods
from attention_lab.kernels import masks

SCORE_MOD, MASK_MOD = "score_mod", "mask_mod"


# ---------------------------------------------------------------- calling mods

def apply_dense(logits, score_mod=None, mask_mod=None):
  """Applies mods to a whole score matrix (the definition ``reference`` uses).

  Args:
    logits: ``[batch..., heads, q_length, kv_length]`` scaled, biased logits.

  Returns:
    ``(logits, mask)``: the modded logits (same shape and dtype; keys that
    were ``-inf`` stay ``-inf``) and the ``mask_mod`` mask broadcast to that
    shape (None without a ``mask_mod``).
  """
  shape = logits.shape
  flat = logits.reshape((-1,) + shape[-3:])
  index = masks.mod_index_grid(flat.shape[0], shape[-3], jnp.arange(shape[-2]),
                               jnp.arange(shape[-1]))
  mask = None
  if score_mod is not None:
    flat = guarded_score_mod(score_mod, flat, *index)
  if mask_mod is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask_mod(*index), bool), flat.shape).reshape(shape)
  return flat.reshape(shape), mask


def guarded_score_mod(score_mod, score, *index):
  """``score_mod`` on ``score``, keeping ``-inf`` (hidden) scores ``-inf``.

  The mod sees 0 in their place, so neither its value nor its gradient can
  turn a hidden key into a NaN.
  """
  hidden = score == -jnp.inf
  modded = score_mod(jnp.where(hidden, 0.0, score), *index)
  modded = jnp.broadcast_to(jnp.asarray(modded, score.dtype), score.shape)
  return jnp.where(hidden, -jnp.inf, modded)


def hoist(fn: Callable, *example_args) -> Tuple[Callable, List]:
  """Closure conversion for a custom backward: ``fn`` as a function of
  ``(*args, *consts)`` plus the arrays it closes over.

  ``fn`` is traced on ``example_args`` (arrays or ``jax.ShapeDtypeStruct``);
  every array it reads that is not an argument (a learned table, traced
  document ids, a NumPy constant) becomes an explicit trailing argument, so a
  ``custom_vjp`` can take it as an input and return its cotangent, and
  closes over nothing traced. ``jax.closure_convert`` hoists only the values
  that may carry a tangent and leaves integer tracers in the closure; this
  hoists all of them. The converted function is specialised to the example
  shapes.
  """
  closed = jax.make_jaxpr(fn)(*example_args)
  return _converted(closed, len(example_args)), list(closed.consts)


def _converted(closed, n_args: int) -> Callable:
  """A traced function as ``f(*args, *consts)``."""
  def converted(*args_and_consts):
    args, hoisted = args_and_consts[:n_args], args_and_consts[n_args:]
    (out,) = jax.core.eval_jaxpr(closed.jaxpr, list(hoisted), *args)
    return out

  return converted


# What a mod may do and still give the same answer on a transposed block:
# what a fused kernel body takes, less what is tied to a block's axis order
# (reshapes, iotas), plus gathers from the arrays it closes over (a table
# indexed by head or position).
_LAYOUT_FREE = ((fused_mods.INSIDE_PRIMITIVES - {"reshape", "squeeze", "expand_dims", "iota"})
                | {"gather"})


def _layout_free(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    # jnp indexing stacks its integer index arrays along a new last axis.
    if name == "concatenate" and all(jnp.issubdtype(v.aval.dtype, jnp.integer)
                                     for v in eqn.invars):
      continue
    if name not in _LAYOUT_FREE:
      return False
    for sub in jex_core.jaxprs_in_params(eqn.params):
      if not _layout_free(sub):
        return False
  return True


def hoist_keys_major(fn: Callable, consts: List, score, batch, head, q_idx, kv_idx
                     ) -> Optional[Callable]:
  """``fn`` (a score_mod hoisted by ``hoist`` for query-major blocks
  ``score [b, n, bq, bk]`` with ``q_idx [1, 1, bq, 1]``, ``kv_idx [1, 1, 1,
  bk]``) hoisted again for keys-major blocks (``[b, n, bk, bq]``, ``q_idx
  [1, 1, 1, bq]``, ``kv_idx [1, 1, bk, 1]``), taking the same ``consts``; or
  None when it cannot be trusted to give the transposed answer (its
  operations depend on the axis order, or it closes over other arrays).

  A backward pass that keeps its blocks keys-major then evaluates the mod in
  place instead of transposing the mod's terms into its layout.
  """
  swap = lambda a: jax.ShapeDtypeStruct(a.shape[:-2] + a.shape[-2:][::-1], a.dtype)
  args = (swap(score), batch, head, swap(q_idx), swap(kv_idx))
  return rehoist(fn, consts, *args, check=_layout_free)


def rehoist(fn: Callable, consts: List, *example_args, check=None) -> Optional[Callable]:
  """``fn`` (a mod ``hoist`` gave ``consts``) hoisted again for other example shapes,
  taking the same ``consts``; or None when it does not trace at those
  shapes, closes over other arrays there, or its jaxpr fails ``check``.
  A kernel that runs a mod on blocks of several shapes (``blockwise``'s
  trimmed visits) passes the one set of consts to each."""
  try:
    closed = jax.make_jaxpr(fn)(*example_args)
  except Exception:   # noqa: BLE001: a mod tied to the block's shape
    return None
  if len(closed.consts) != len(consts) or (check is not None and not check(closed.jaxpr)):
    return None
  for a, b in zip(closed.consts, consts):
    if a is b:
      continue
    if (isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer)
        or np.shape(a) != np.shape(b) or not np.array_equal(np.asarray(a), np.asarray(b))):
      return None
  return _converted(closed, len(example_args))


# ---------------------------------------------------------------- score mods

def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's fixed per-head slopes (Press et al. 2022), float32 ``[num_heads]``.

  For ``n`` a power of two: the geometric sequence ``2^(-8/n), 2^(-16/n),
  ..., 2^(-8)``. Otherwise the slopes of the largest power of two
  ``c < n``, then every other slope of ``2c`` heads for the rest (the
  paper's code).
  """
  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if num_heads <= 0:
    raise ValueError(f"alibi_slopes: num_heads must be positive, got {num_heads}")
  if math.log2(num_heads).is_integer():
    slopes = power_of_two(num_heads)
  else:
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = (power_of_two(closest)
              + list(alibi_slopes(2 * closest)[0::2][:num_heads - closest]))
  return np.asarray(slopes, np.float32)


def alibi(slopes, symmetric: bool = False):
  """ALiBi: a linear distance penalty per head.

  Args:
    slopes: ``[heads]`` (learned, or ``alibi_slopes(heads)``), or an int
      number of heads for the paper's fixed slopes.
    symmetric: penalise ``|i - j|`` (bidirectional attention) instead of
      ``i - j``.

  Reference: ``score[b, h, i, j] + m[h] * (j - i)``, i.e. ``- m[h] (i - j)``
  for the causal keys ``j <= i`` of the paper; ``- m[h] |i - j|`` when
  ``symmetric``.
  """
  if isinstance(slopes, int):
    slopes = alibi_slopes(slopes)

  def score_mod(score, batch, head, q_idx, kv_idx):
    distance = kv_idx - q_idx
    if symmetric:
      distance = -jnp.abs(distance)
    return score + jnp.asarray(slopes)[head] * distance.astype(score.dtype)

  return score_mod


def softcap(cap: float):
  """tanh soft-capping of the logits (Gemma 2, Grok).

  Reference: ``cap * tanh(score / cap)``, scores squashed into
  ``(-cap, cap)``.
  """
  if isinstance(cap, (int, float)) and not cap > 0:     # a traced (learned) cap is not checked
    raise ValueError(f"softcap: cap must be positive, got {cap}")

  def score_mod(score, batch, head, q_idx, kv_idx):
    return cap * jnp.tanh(score / cap)

  return score_mod


def relative_bias(table, max_distance: int):
  """A learned scalar bias per head and clipped relative distance (the
  clipping of Shaw et al. 2018, as one number per head and distance).

  Args:
    table: ``[heads, 2 * max_distance + 1]``; column ``d + max_distance``
      holds the bias for key-minus-query distance ``d``.
    max_distance: distances beyond it share the last column.

  Reference: ``score[b, h, i, j] + table[h, clip(j - i, -D, D) + D]``.
  """
  if np.ndim(table) != 2 or np.shape(table)[-1] != 2 * max_distance + 1:
    raise ValueError(f"relative_bias: table {np.shape(table)} needs "
                     f"2 * max_distance + 1 = {2 * max_distance + 1} columns")

  def score_mod(score, batch, head, q_idx, kv_idx):
    column = jnp.clip(kv_idx - q_idx, -max_distance, max_distance) + max_distance
    return score + jnp.asarray(table)[head, column].astype(score.dtype)

  return score_mod


def t5_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32,
              max_distance: int = 128):
  """T5's relative-position bucket (Raffel et al. 2020) of ``kv - q``, int32.

  Half the buckets (per direction when ``bidirectional``) hold the exact
  distances ``0 .. num_buckets/2 - 1``; the rest cover larger distances on a
  log scale up to ``max_distance``, beyond which all share the last bucket.
  Keys after the query get buckets of their own when ``bidirectional``;
  otherwise they share bucket 0 (a causal decoder never sees them).

  ``relative_position``: int, any shape (``kv_idx - q_idx``); returns int32
  buckets in ``[0, num_buckets)`` of the same shape.
  """
  n = -jnp.asarray(relative_position, jnp.int32)            # query minus key
  offset = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(n < 0, num_buckets, 0)
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  exact = num_buckets // 2
  # log(n / exact) / log(max_distance / exact) of the remaining buckets; n is
  # at least 1 inside the log (small n take the exact branch anyway).
  scaled = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
            / np.log(max_distance / exact) * (num_buckets - exact))
  large = jnp.minimum(exact + scaled.astype(jnp.int32), num_buckets - 1)
  return offset + jnp.where(n < exact, n, large)


def t5_relative_bias(table, bidirectional: bool = True, max_distance: int = 128):
  """T5's learned bias per head and relative-position bucket.

  Args:
    table: ``[heads, num_buckets]``, learned.
    bidirectional / max_distance: as ``t5_bucket``.

  Reference: ``score[b, h, i, j] + table[h, t5_bucket(j - i)]``.
  """
  num_buckets = np.shape(table)[-1]

  def score_mod(score, batch, head, q_idx, kv_idx):
    bucket = t5_bucket(kv_idx - q_idx, bidirectional, num_buckets, max_distance)
    return score + jnp.asarray(table)[head, bucket].astype(score.dtype)

  return score_mod


# ---------------------------------------------------------------- mask mods
# Factories with hashable arguments are cached so one shape computes its
# block mask once however often a model builds the mod.

@functools.lru_cache(maxsize=None)
def causal():
  """Start-aligned causal mask. Reference: ``j <= i``."""
  def mask_mod(batch, head, q_idx, kv_idx):
    return kv_idx <= q_idx
  return mask_mod


def sliding_window(window):
  """Local band (``local_window_size``'s meaning): ``w`` or ``(left, right)``.

  Reference: ``i - left <= j <= i + right``; ``and_masks(causal(),
  sliding_window((w, 0)))`` for a causal window.
  """
  return _sliding_window(masks._window_sides(window))


@functools.lru_cache(maxsize=None)
def _sliding_window(sides):
  left, right = sides

  def mask_mod(batch, head, q_idx, kv_idx):
    return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)
  return mask_mod


def prefix_lm(prefix_length):
  """Prefix-LM: bidirectional over a prefix, causal after it (T5, UniLM).

  Args:
    prefix_length: an int, or int ``[batch]`` per sequence.

  Reference: ``j <= i or j < prefix[b]``.
  """
  if isinstance(prefix_length, (int, np.integer)):
    return _prefix_lm_static(int(prefix_length))
  prefix = prefix_length

  def mask_mod(batch, head, q_idx, kv_idx):
    per_row = jnp.asarray(prefix)
    return (kv_idx <= q_idx) | (kv_idx < (per_row[batch] if per_row.ndim else per_row))
  return mask_mod


@functools.lru_cache(maxsize=None)
def _prefix_lm_static(prefix_length: int):
  def mask_mod(batch, head, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < prefix_length)
  return mask_mod


def document(segment_ids, kv_segment_ids=None):
  """Document masking for packed sequences: attend within the same document.

  Args:
    segment_ids: int ``[batch, q_length]``, a document id per query token
      (give padding an id of its own, or pass ``kv_lengths``).
    kv_segment_ids: int ``[batch, kv_length]``; defaults to ``segment_ids``
      (self-attention).

  Reference: ``seg_q[b, i] == seg_kv[b, j]``. Concrete ids give a static
  block mask (blocks between documents skipped); ids traced inside ``jit``
  are compared in every block.
  """
  # Kept as given (NumPy stays NumPy, so it stays concrete inside jit and the
  # block mask can be computed); converted where indexed by the index arrays.
  q_ids = segment_ids
  kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids

  def mask_mod(batch, head, q_idx, kv_idx):
    return jnp.asarray(q_ids)[batch, q_idx] == jnp.asarray(kv_ids)[batch, kv_idx]
  return mask_mod


def and_masks(*mask_mods):
  """A ``mask_mod`` visible where every one of ``mask_mods`` is."""
  return functools.reduce(lambda f, g: _both(f, g, jnp.logical_and), mask_mods)


def or_masks(*mask_mods):
  """A ``mask_mod`` visible where any of ``mask_mods`` is."""
  return functools.reduce(lambda f, g: _both(f, g, jnp.logical_or), mask_mods)


def _both(f, g, op):
  return lambda *index: op(f(*index), g(*index))


def chain(*score_mods):
  """A ``score_mod`` applying ``score_mods`` in order."""
  def score_mod(score, *index):
    for mod in score_mods:
      score = mod(score, *index)
    return score
  return score_mod


# ---------------------------------------------------------------- registry

_MODS: Dict[str, Tuple[Callable, str]] = {}


def register(name: str, factory: Callable, kind: str) -> None:
  """Names a mod factory for configs. ``kind``: ``"score_mod"`` or ``"mask_mod"``."""
  if kind not in (SCORE_MOD, MASK_MOD):
    raise ValueError(f"mod {name!r}: kind must be {SCORE_MOD!r} or {MASK_MOD!r}, got {kind!r}")
  _MODS[name] = (factory, kind)


def names() -> List[str]:
  """Registered mod names, sorted."""
  return sorted(_MODS)


def get(name: str) -> Callable:
  """The factory registered as ``name`` (``get("alibi")(8)`` builds a score_mod)."""
  try:
    return _MODS[name][0]
  except KeyError:
    raise ValueError(f"unknown attention mod {name!r}; known mods: {', '.join(names())}") from None


def kind(name: str) -> str:
  """``"score_mod"`` or ``"mask_mod"``: which hook the named mod goes to."""
  get(name)
  return _MODS[name][1]


for _name, _factory, _kind in (
    ("alibi", alibi, SCORE_MOD), ("softcap", softcap, SCORE_MOD),
    ("relative_bias", relative_bias, SCORE_MOD),
    ("t5_relative_bias", t5_relative_bias, SCORE_MOD), ("causal", causal, MASK_MOD),
    ("sliding_window", sliding_window, MASK_MOD), ("prefix_lm", prefix_lm, MASK_MOD),
    ("document", document, MASK_MOD)):
  register(_name, _factory, _kind)
del _name, _factory, _kind
