"""Attention masks: one convention everywhere.

A mask is a boolean array where ``True`` means *attend* (the convention of
``jax.nn.dot_product_attention`` and Flax). Masks broadcast against the score
matrix ``[batch..., heads, q_length, kv_length]``; the helpers below return the
smallest shape that does, so they can be combined with ``combine_masks``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Window = Union[int, Tuple[int, int]]


def padding_mask(lengths, max_length: int):
  """Valid-position mask from sequence lengths.

  Args:
    lengths: int array ``[batch...]``, number of valid (leading) positions.
    max_length: the padded length.

  Returns:
    bool ``[batch..., max_length]``; ``True`` at positions ``< lengths``.
  """
  lengths = jnp.asarray(lengths)
  return jnp.arange(max_length) < lengths[..., None]


def attention_mask(query_valid, key_valid=None):
  """Pairwise mask from per-position validity.

  Args:
    query_valid: bool ``[batch..., q_length]``.
    key_valid: bool ``[batch..., kv_length]``; defaults to ``query_valid``
      (self-attention).

  Returns:
    bool ``[batch..., 1, q_length, kv_length]`` (the 1 broadcasts over heads).
  """
  if key_valid is None:
    key_valid = query_valid
  query_valid = jnp.asarray(query_valid, bool)
  key_valid = jnp.asarray(key_valid, bool)
  return (query_valid[..., None, :, None] & key_valid[..., None, None, :])


def key_padding_mask(key_lengths, kv_length: int):
  """Mask that hides padded keys only (every query row stays valid).

  Args:
    key_lengths: int ``[batch...]``.
    kv_length: the padded key length.

  Returns:
    bool ``[batch..., 1, 1, kv_length]``.
  """
  return padding_mask(key_lengths, kv_length)[..., None, None, :]


def causal_mask(q_length: int, kv_length: Optional[int] = None):
  """Lower-triangular mask: query ``i`` sees keys ``j <= i``.

  Positions are counted from the start of both sequences, as in
  ``jax.nn.dot_product_attention(is_causal=True)`` and Flax's
  ``make_causal_mask``; decoding against a longer cache passes an explicit mask.

  Returns:
    bool ``[q_length, kv_length]``.
  """
  kv_length = q_length if kv_length is None else kv_length
  q = jnp.arange(q_length)[:, None]
  k = jnp.arange(kv_length)[None, :]
  return k <= q


def _window_sides(window: Window) -> Tuple[int, int]:
  if isinstance(window, int):
    left, right = window, window
  else:
    left, right = window
  if left < 0 or right < 0:
    raise ValueError(f"window sizes must be >= 0, got {window!r}")
  return int(left), int(right)


def sliding_window_mask(q_length: int, kv_length: Optional[int] = None,
                        window: Window = 0):
  """Local band: query ``i`` sees keys ``i - left <= j <= i + right``.

  Args:
    window: ``w`` for a symmetric band or ``(left, right)``; the same meaning
      as ``local_window_size`` in ``jax.nn.dot_product_attention``. Combine with
      ``causal_mask`` (or pass ``is_causal``) for a causal sliding window.

  Returns:
    bool ``[q_length, kv_length]``.
  """
  kv_length = q_length if kv_length is None else kv_length
  left, right = _window_sides(window)
  q = jnp.arange(q_length)[:, None]
  k = jnp.arange(kv_length)[None, :]
  return (k >= q - left) & (k <= q + right)


def combine_masks(*masks):
  """Logical AND of masks, skipping ``None``; ``None`` if all are ``None``.

  Each mask is bool (True = attend), e.g. ``[batch..., 1, q, kv]`` padding and
  ``[q, kv]`` causal; the result has their broadcast shape.
  """
  masks = [jnp.asarray(m, bool) for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


# ---------------------------------------------------------------- mask_mod grids and block masks

def mod_index_grid(batch: int, heads: int, q_positions, kv_positions):
  """The index arrays a ``score_mod`` / ``mask_mod`` receives.

  Args:
    batch: number of sequences (all batch dims flattened, row-major; 1 when
      there are none).
    heads: query heads.
    q_positions / kv_positions: int ``[Q]`` / ``[K]`` positions of the
      queries and keys of this grid (a whole sequence or one block).

  Returns:
    int32 ``batch_idx [batch, 1, 1, 1]``, ``head_idx [1, heads, 1, 1]``,
    ``q_idx [1, 1, Q, 1]``, ``kv_idx [1, 1, 1, K]``: they broadcast against
    each other and against scores ``[batch, heads, Q, K]``.
  """
  as_int = lambda x: jnp.asarray(x, jnp.int32)
  return (as_int(jnp.arange(batch)).reshape(batch, 1, 1, 1),
          as_int(jnp.arange(heads)).reshape(1, heads, 1, 1),
          as_int(q_positions).reshape(1, 1, -1, 1),
          as_int(kv_positions).reshape(1, 1, 1, -1))


EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """Which key blocks each query block needs, as static NumPy data.

  Attributes:
    state: int8 ``[nq, nk]``: ``EMPTY`` (no visible pair: skipped),
      ``PARTIAL`` (masked inside), ``FULL`` (every pair visible: no masking),
      each for every batch row and head at once (a block is empty or full
      only when it is so for all of them).
    kv_blocks: int32 ``[nq, nk]``: per query block the key blocks to visit,
      full ones first, then partial ones (the rest is padding).
    kv_full / kv_count: int32 ``[nq]``: how many of those are full / in all.
    q_blocks, q_full, q_count: the same per key block over query blocks
      (the backward pass visits query blocks per key block).
  """
  state: np.ndarray
  kv_blocks: np.ndarray
  kv_full: np.ndarray
  kv_count: np.ndarray
  q_blocks: np.ndarray
  q_full: np.ndarray
  q_count: np.ndarray

  @classmethod
  def from_state(cls, state) -> "BlockMask":
    state = np.asarray(state, np.int8)

    def lists(rows):
      order = np.argsort(-rows, axis=1, kind="stable")          # FULL, PARTIAL, EMPTY
      return (order.astype(np.int32), (rows == FULL).sum(1).astype(np.int32),
              (rows != EMPTY).sum(1).astype(np.int32))

    kv_blocks, kv_full, kv_count = lists(state)
    q_blocks, q_full, q_count = lists(state.T)
    return cls(state, kv_blocks, kv_full, kv_count, q_blocks, q_full, q_count)

  @property
  def sparsity(self) -> float:
    """Fraction of blocks skipped."""
    return float((self.state == EMPTY).mean())


@dataclasses.dataclass(frozen=True, eq=False)
class Visits:
  """The inner blocks a kernel's loop visits per outer block, placed on a
  grain finer than the block (``place_visits``).

  Attributes:
    starts: int32 ``[n_outer, width]``: per outer block, the first position
      of each inner block to visit, longest first and full ones first
      within a length (``ranges``; the rest is padding).
    lows: int32 ``[n_outer, width]``: the first position each visit counts;
      above ``starts`` only for a block shifted back over the one before it
      to stay inside the padded length (the overlap is masked, never
      counted twice).
    full / count: int32 ``[n_outer]``: how many visits are full (no masking)
      / in all.
    shifted: whether any visit has ``lows > starts``.
    sizes: int32 ``[n_outer, width]``: each visit's length (the block, or
      less for a trimmed visit, ``place_visits(trim=True)``).
    groups: the distinct visit lengths, longest first.
    ranges: int32 ``[n_outer, len(groups), 3]``: per outer block and length,
      where its visits of that length begin, where their full ones end and
      where they end in ``starts`` (visits sorted by length, full ones first
      within a length): a kernel runs one loop per length and masking.
  """
  starts: np.ndarray
  lows: np.ndarray
  full: np.ndarray
  count: np.ndarray
  shifted: bool
  sizes: np.ndarray
  groups: Tuple[int, ...]
  ranges: np.ndarray

  @property
  def visited(self) -> int:
    """Inner blocks visited over all outer blocks."""
    return int(self.count.sum())


def place_visits(state, rows: int, n_outer: int, block: int, grain: int,
                 padded: int, trim: bool = False) -> Visits:
  """Where a kernel's inner blocks go, from a block mask on a fine grain.

  A block mask at the kernel's own block sizes visits whole aligned inner
  blocks: a band or a document that starts just before a block boundary
  costs a block more. Here the mask is known per ``grain`` positions and each
  inner block may start at any multiple of ``grain``: per outer block the
  needed grains are covered left to right, each block starting at the first
  needed grain not yet covered (the fewest blocks of this size that cover
  them). A sliding window of 128 to 256 keys at 4,096 tokens visits 16 blocks
  of 256 x 512 instead of 23.

  Args:
    state: int8 ``[outer grains, inner grains]`` (``BlockMask.state`` at
      ``grain``-sized inner blocks): rows are outer grains (``rows`` of them
      per outer block), columns inner ones.
    rows: outer grains per outer block.
    n_outer: outer blocks (those past the mask's rows visit nothing).
    block: the inner block size, a multiple of ``grain``.
    grain: inner positions per column of ``state``.
    padded: the padded inner length, a multiple of ``block``: every visit
      ends inside it (the last of a row is shifted back when it would not).
    trim: end each visit at the last needed grain it covers instead of a
      whole block later (visits of several lengths, each a multiple of
      ``grain``). Never shifted: a trimmed visit ends inside the mask. The
      benchmark's 8 documents at 1,024 tokens, 256 x 512 blocks, cover 50%
      of the score area instead of 75%; at 8,192 tokens 21% instead of 24%.

  Returns:
    ``Visits``; a visit is full when every pair in it is visible.
  """
  state = np.asarray(state)
  n_inner = padded // grain
  starts, lows, sizes, flags = [], [], [], []
  for o in range(n_outer):
    part = state[o * rows:(o + 1) * rows]
    # Every visit ends inside the padded length: whole blocks start at most
    # a block before it, trimmed ones end at their last needed grain.
    need = np.zeros(n_inner, bool)
    full = np.zeros(n_inner, bool)
    if len(part):
      need[:state.shape[1]] = (part != EMPTY).any(0)
      full[:state.shape[1]] = (part == FULL).all(0)
    at = np.flatnonzero(need) * grain
    row, end = [], 0
    while True:
      j = np.searchsorted(at, end)          # the first needed grain not covered
      if j == len(at):
        break
      if trim:
        start = int(at[j])
        size = int(at[at < start + block][-1]) + grain - start
        low = start
      else:
        start, size = min(int(at[j]), padded - block), block
        low = max(start, end)
      cells = slice(start // grain, (start + size) // grain)
      row.append((start, low, low == start and bool(full[cells].all()), size))
      end = start + size
    row.sort(key=lambda visit: (-visit[3], not visit[2]))   # by length, full ones first
    starts.append([v[0] for v in row])
    lows.append([v[1] for v in row])
    sizes.append([v[3] for v in row])
    flags.append([v[2] for v in row])
  width = max(1, max(len(r) for r in starts) if starts else 1)
  table = lambda rs: np.array([r + [0] * (width - len(r)) for r in rs], np.int32).reshape(
      n_outer, width)
  starts_a, lows_a, sizes_a = table(starts), table(lows), table(sizes)
  groups = tuple(sorted({size for r in sizes for size in r}, reverse=True)) or (block,)
  ranges = np.zeros((n_outer, len(groups), 3), np.int32)
  for o, (r, full_of) in enumerate(zip(sizes, flags)):
    at = 0
    for g, size in enumerate(groups):
      n = sum(1 for x in r if x == size)
      ranges[o, g] = (at, at + sum(full_of[at:at + n]), at + n)
      at += n
  return Visits(starts_a, lows_a, np.array([sum(f) for f in flags], np.int32),
                np.array([len(r) for r in starts], np.int32),
                bool((lows_a > starts_a).any()), sizes_a, groups, ranges)


_BLOCK_MASKS: "collections.OrderedDict" = collections.OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64


def block_mask(mask_mod, batch: int, heads: int, q_length: int, kv_length: int,
               block_q: int, block_k: int, *, is_causal: bool = False,
               window: Optional[Tuple[int, int]] = None) -> Optional[BlockMask]:
  """The block mask of ``mask_mod`` (and causal / window), or None.

  ``mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool`` is evaluated on
  the index grid at trace time, one query block at a time (memory
  ``batch x heads x block_q x kv_length`` at most, and only over the axes the
  mod depends on). That works when it depends on the indices and on concrete
  arrays only; when it reads a traced array (document ids inside ``jit``) no
  static answer exists and this returns None: the kernel then evaluates the
  mod in every block and skips nothing but what causal / window allow.

  Cached per (mod, shape, blocks): a mod built once (the ``mods`` library
  returns the same object for the same hashable arguments) costs one
  evaluation per shape, so the arrays it reads must not change in place
  afterwards (NumPy ids edited between calls would keep the old block mask).
  Keys past ``kv_length`` count as hidden, so a block holding padded keys is
  never full.

  Returns:
    None, or a ``BlockMask`` whose ``state`` is int8
    ``[ceil(q_length / block_q), ceil(kv_length / block_k)]``: per block
    empty, partial or full.
  """
  cache_key = (mask_mod, batch, heads, q_length, kv_length, block_q, block_k,
               bool(is_causal), window)
  try:
    hash(cache_key)
  except TypeError:              # an unhashable callable: computed, not cached
    cache_key = None
  if cache_key is not None and cache_key in _BLOCK_MASKS:
    _BLOCK_MASKS.move_to_end(cache_key)
    return _BLOCK_MASKS[cache_key]
  nq, nk = -(-q_length // block_q), -(-kv_length // block_k)
  kv_pad = nk * block_k - kv_length
  state = np.zeros((nq, nk), np.int8)
  k_pos = np.arange(kv_length)
  with _evaluate_now():
    for qi in range(nq):
      q_pos = np.arange(qi * block_q, min((qi + 1) * block_q, q_length))
      try:
        visible = mask_mod(*mod_index_grid(batch, heads, q_pos, k_pos))
      except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
              jax.errors.TracerIntegerConversionError):
        return None
      if isinstance(visible, jax.core.Tracer):
        return None
      visible = np.asarray(visible, bool)
      visible = visible.reshape((1,) * (4 - visible.ndim) + visible.shape)
      visible = np.broadcast_to(visible, visible.shape[:2] + (len(q_pos), kv_length))
      if is_causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
      if window is not None:
        left, right = window
        visible = (visible & (k_pos[None, :] >= q_pos[:, None] - left)
                   & (k_pos[None, :] <= q_pos[:, None] + right))
      padded = np.pad(visible, [(0, 0)] * 3 + [(0, kv_pad)])      # padded keys: hidden
      per_block = padded.reshape(padded.shape[:3] + (nk, block_k))
      any_ = per_block.any(axis=(0, 1, 2, 4))
      all_ = per_block.all(axis=(0, 1, 2, 4))
      state[qi] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
  result = BlockMask.from_state(state)
  if cache_key is not None:
    _BLOCK_MASKS[cache_key] = result
    while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
      _BLOCK_MASKS.popitem(last=False)
  return result


def band_block_mask(q_length: int, kv_length: int, block_q: int, block_k: int, *,
                    is_causal: bool = False, window: Optional[Tuple[int, int]] = None,
                    exact: bool = True) -> BlockMask:
  """The block mask of causal and / or windowed attention, from the block
  corners (no mod evaluated): the same ``BlockMask`` a ``mask_mod`` gets, so
  a kernel walks causal, windowed and ``mask_mod`` attention with one loop.

  Query ``q`` sees keys ``[lo(q), hi(q)]`` with ``lo(q) = q - left`` and
  ``hi(q) = min(q + right, q if causal)``; both step right with ``q``, so
  the rows of ``[q0, q1]`` together see the one interval ``[lo(q0), hi(q1)]``
  and a block ``[q0, q1] x [k0, k1]`` (``k1`` cut at the last valid key)
  holds a visible pair iff ``k0 <= hi(q1)`` and ``k1 >= lo(q0)``; every
  pair is visible iff ``k0 >= lo(q1)`` and ``k1 <= hi(q0)``. Keys past
  ``kv_length`` are hidden (a block holding padded keys is never full);
  query rows past ``q_length`` do not count.
  ``exact=False`` marks full blocks partial (something else, a mod that
  reads traced arrays, may still hide pairs inside them).
  """
  nq, nk = -(-q_length // block_q), -(-kv_length // block_k)
  q0 = np.arange(nq)[:, None] * block_q
  q1 = np.minimum(q0 + block_q, q_length) - 1
  k0 = np.arange(nk)[None, :] * block_k
  k1 = k0 + block_k - 1
  big = q_length + kv_length + 1           # "no limit" on a side
  left, right = window if window is not None else (big, big)
  hi = lambda q: np.minimum(q + right, q) if is_causal else q + right
  lo = lambda q: q - left
  k1_valid = np.minimum(k1, kv_length - 1)
  any_ = (k0 <= np.minimum(hi(q1), k1_valid)) & (k1_valid >= lo(q0))
  all_ = (k0 >= lo(q1)) & (k1 <= hi(q0)) & (k1 <= kv_length - 1) & exact
  return BlockMask.from_state(np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)))


@contextlib.contextmanager
def _evaluate_now():
  """Evaluates a mod's JAX ops eagerly on the host while a step is traced,
  also under the abstract mesh of a cross-lowering (which refuses eager
  computation that could land on its devices): these are mask shapes, not
  device work."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    with jax.ensure_compile_time_eval():
      yield


_TRACED = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
           jax.errors.TracerIntegerConversionError)
_STATIC_MASKS: "collections.OrderedDict" = collections.OrderedDict()
_STATIC_MASK_CACHE_SIZE = 16


def mod_dependence(mask_mod, batch: int, heads: int) -> Optional[Tuple[bool, bool]]:
  """Whether ``mask_mod`` varies with the batch index and with the head,
  read off the shape of its answer on a one-position grid (a mod broadcasts
  only over the indices it uses); None when it reads traced arrays."""
  with _evaluate_now():
    try:
      visible = mask_mod(*mod_index_grid(batch, heads, [0], [0]))
    except _TRACED:
      return None
  if isinstance(visible, jax.core.Tracer):
    return None
  shape = (1,) * (4 - np.ndim(visible)) + np.shape(visible)
  return shape[0] != 1, shape[1] != 1


def static_mask(mask_mod, batch: int, heads: int, q_length: int, kv_length: int, *,
                is_causal: bool = False,
                window: Optional[Tuple[int, int]] = None) -> Optional[np.ndarray]:
  """``mask_mod`` (with causal / window) evaluated once into NumPy: bool
  ``[batch | 1, heads | 1, q_length, kv_length]``, size one along the indices
  it does not read; None when it reads traced arrays. For kernels that take a
  mask as static data (splash); cached like ``block_mask``."""
  cache_key = (mask_mod, batch, heads, q_length, kv_length, bool(is_causal), window)
  try:
    hash(cache_key)
  except TypeError:
    cache_key = None
  if cache_key is not None and cache_key in _STATIC_MASKS:
    _STATIC_MASKS.move_to_end(cache_key)
    return _STATIC_MASKS[cache_key]
  q_pos, k_pos = np.arange(q_length), np.arange(kv_length)
  with _evaluate_now():
    try:
      visible = mask_mod(*mod_index_grid(batch, heads, q_pos, k_pos))
    except _TRACED:
      return None
  if isinstance(visible, jax.core.Tracer):
    return None
  visible = np.asarray(visible, bool)
  visible = visible.reshape((1,) * (4 - visible.ndim) + visible.shape)
  visible = np.broadcast_to(visible, visible.shape[:2] + (q_length, kv_length))
  band = np.ones((q_length, kv_length), bool)
  if is_causal:
    band &= k_pos[None, :] <= q_pos[:, None]
  if window is not None:
    left, right = window
    band &= (k_pos[None, :] >= q_pos[:, None] - left) & (k_pos[None, :] <= q_pos[:, None] + right)
  visible = visible & band
  if cache_key is not None:
    _STATIC_MASKS[cache_key] = visible
    while len(_STATIC_MASKS) > _STATIC_MASK_CACHE_SIZE:
      _STATIC_MASKS.popitem(last=False)
  return visible
