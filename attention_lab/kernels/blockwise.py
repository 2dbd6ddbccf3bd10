"""Blockwise (flash-style) attention in plain JAX: O(length) memory, custom backward.

The keys are visited in blocks while an online softmax keeps, per query, the
running maximum ``m``, normaliser ``l`` and weighted sum ``acc``
(Milakov & Gimelshein 2018; Dao et al. 2022). The score matrix never exists in
full: the forward pass keeps ``out`` and the log-sum-exp per query, and the
``custom_vjp`` backward recomputes each block's probabilities from them.

Causal, windowed and ``mask_mod`` attention walk one block mask
(``masks.band_block_mask``, ``masks.block_mask``): per query block, the key
blocks it needs, the full ones without any masking, the partial ones masked,
the empty ones never visited; so causal attention does about half the work of
full attention. The mask is known on a grain finer than the blocks
(``GRAIN``) and each visited block starts where the needed keys start
(``masks.place_visits``), not at a multiple of its size: a sliding window or
a short document costs fewer blocks. The forward also ends each visit after
the last grain of keys it needs (``_trim_pays``), one loop per visit length.
The backward walks key blocks outer (dQ added in place), or query blocks
outer over the forward's trimmed visits (dK and dV added in place) when
those cover fewer keys: a window narrower than a key block, documents.

``score_mod`` / ``mask_mod`` (``attention_lab.kernels.mods``) run on each
block in the forward and again in the backward, which also returns the
cotangents of the arrays a ``score_mod`` closes over (hoisted into explicit
``custom_vjp`` inputs). A ``mask_mod`` that reads traced arrays has no
static block mask: it is evaluated in every block causal / window leave.

Layout inside: heads-major ``[batch, heads, length, dim]`` so each block is a
batch of plain matrix products.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_lab.kernels import checks
from attention_lab.kernels import masks
from attention_lab.kernels import mods
from attention_lab.kernels import tuning
from attention_lab.kernels.dropout import dropout_keep
from attention_lab.kernels.dropout import dropout_seed
from attention_lab.kernels.masks import _window_sides
from attention_lab.kernels.reference import heads_major

# (block_q, block_k) when this CPU has no tuned blocks (kernels.tuning;
# benchmarks/tune.py measures them), for full and for banded (causal,
# windowed, mask_mod) attention. Measured on this project's 2-core AMD EPYC
# (benchmarks/README.md), forward+backward: 128 x 1024 is the fastest or
# within 2% of it for full attention at 1,024-4,096 keys and head_dim 32 and
# 64 (256 x 1024, the earlier default, was 7-23% slower); banded attention
# skips and masks at key-block granularity, where 256 x 512 was the fastest
# at every length but one.
DEFAULT_BLOCKS = {False: (128, 1024), True: (256, 512)}
_NEG_INF = -jnp.inf


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _compact(x, batch: Tuple[int, ...], fill, q_pad: int, kv_pad: int):
  """Mask or bias ``[batch..., heads, q, kv]`` (broadcastable) -> 4-D
  (``checks.collapse_batch``), its query and key dims padded with ``fill``."""
  if x is None:
    return None
  x = checks.collapse_batch(x, batch)
  pads = [(0, 0), (0, 0),
          (0, q_pad if x.shape[2] != 1 else 0),
          (0, kv_pad if x.shape[3] != 1 else 0)]
  return jnp.pad(x, pads, constant_values=fill) if any(p[1] for p in pads) else x


def _block(x, q_start, bq, k_start, bk):
  """The ``[.., bq, bk]`` block of a compact mask/bias (size-1 dims kept)."""
  if x is None:
    return None
  starts = (0, 0, q_start if x.shape[2] != 1 else 0, k_start if x.shape[3] != 1 else 0)
  sizes = (x.shape[0], x.shape[1], bq if x.shape[2] != 1 else 1, bk if x.shape[3] != 1 else 1)
  return lax.dynamic_slice(x, starts, sizes)


# Key blocks (query blocks in the backward) start at any multiple of this
# many positions, not only at multiples of the block (masks.place_visits),
# and trimmed visits end at one: a band or a document visits fewer blocks
# and fewer keys. At 4,096 tokens, 256 x 512 blocks: a causal window of
# 128-256 keys visits 16 key blocks instead of 23, the benchmark's 8
# documents 36 instead of 44, trimmed to 24% of the score area. 64 rather
# than 128: the documents' trimmed visits cover 45% / 24% / 20% of the area
# at 1,024 / 4,096 / 8,192 tokens instead of 50% / 26% / 21%; side by side,
# two runs, forward 0.92-0.97x / 0.96-0.99x / 0.96-0.97x the time; causal
# and the window unchanged (0.95-1.03x); compiling the 8,192-token
# documents' forward+backward 4.0 s instead of 2.9. A grain of 32 gained
# no more (forward 0.90 / 1.03 / 0.97x the time of 128's).
GRAIN = 64


def _grain(block: int) -> int:
  """The largest divisor of ``block`` up to ``GRAIN`` (``block`` itself when
  that divisor is below ``GRAIN / 4``: so fine a grain would cost more to
  plan than it saves)."""
  grain = max(d for d in range(1, min(block, GRAIN) + 1) if block % d == 0)
  return grain if 4 * grain >= GRAIN or grain == block else block


# At most this many visit lengths: each costs a loop (two, full and masked)
# in the forward and in the backward's queries-outer walk, and the mods are
# hoisted again per length. 512-key blocks on a grain of 64 have at most 8.
TRIM_LENGTHS = 8


def _trim_pays(whole, trimmed) -> bool:
  """Whether the forward (and the backward's queries-outer walk) visits
  ``trimmed`` visits rather than ``whole`` blocks (``masks.Visits``).

  Where they save keys, unless whole blocks give every query block the same
  trip counts: those are static loop bounds (``_Static._loops``), and XLA
  removes one-trip loops, which visits of several lengths break (causal
  at 512 tokens, two query blocks over one key block: forward+backward
  19.7 ms trimmed against 8.3 whole), or they have more than
  ``TRIM_LENGTHS`` lengths. Where it pays: benchmarks/flex.py's 8 documents
  at 1,024 tokens visit a third fewer keys, forward 0.77-0.79x the time of
  whole blocks; at 8,192 tokens 11% fewer, 0.94-0.95x; causal at 8,192
  tokens, 3% fewer, forward 0.99x and forward+backward 0.97x.
  """
  same_trips = (whole.count == whole.count[0]).all() and (whole.full == whole.full[0]).all()
  return bool(not same_trips and len(trimmed.groups) <= TRIM_LENGTHS
              and trimmed.sizes.sum() < whole.sizes.sum())


def _visits(state, block_q, block_k, grain_q, grain_k, q_len, kv_len):
  """``{"fwd": the forward's visits (and the backward's queries-outer
  walk's), trimmed where that pays (``_trim_pays``), "kv": the same whole
  blocks long, "q": the backward's keys-outer visits}`` of a block mask on
  the ``grain_q x grain_k`` grid (``masks.place_visits``)."""
  q_padded, kv_padded = _round_up(q_len, block_q), _round_up(kv_len, block_k)
  place_kv = functools.partial(masks.place_visits, state, block_q // grain_q,
                               q_padded // block_q, block_k, grain_k, kv_padded)
  kv, trimmed = place_kv(), place_kv(trim=True)
  fwd = trimmed if _trim_pays(kv, trimmed) else kv
  return {"fwd": fwd, "kv": kv,
          "q": masks.place_visits(np.asarray(state).T, block_k // grain_k,
                                  kv_padded // block_k, block_q, grain_q, q_padded)}


def _queries_outer(visits, block_k) -> bool:
  """Whether the backward walks query blocks outer, over the forward's
  (trimmed) visits: when those cover fewer keys than the keys-outer walk's
  query visits of whole key blocks."""
  return bool(visits["fwd"].sizes.sum() < visits["q"].visited * block_k)


class _Static:
  """Static settings of one call: lengths, blocks, masking forms, hoisted mods
  and the block mask."""

  def __init__(self, q_len, kv_len, block_q, block_k, scale, causal, window,
               has_mask=False, has_lengths=False, batch=1, heads=1, has_bias=False,
               score_mod=None, score_params=(), mask_mod=None, visits=None,
               groups=1, keep_prob=None, broadcast_dropout=True, score_mod_t=None,
               length_bounds=False, sized_mods=None):
    self.q_len, self.kv_len = q_len, kv_len
    self.batch, self.heads, self.has_bias = batch, heads, has_bias
    # Query heads per K/V head: K and V stay [b, heads / groups, ...] and
    # each block's products run per group (grouped-query attention).
    self.groups = groups
    # Dropout on the weights (None: off); the mask is dropout_keep's hash.
    self.keep_prob, self.broadcast_dropout = keep_prob, broadcast_dropout
    # Hoisted mods: fn(*block, *consts); score_params[i] says whether the
    # score_mod's i-th const gets a cotangent (a traced float array).
    self.score_mod, self.score_params = score_mod, tuple(score_params)
    # The same mod hoisted for keys-major blocks (mods.hoist_keys_major), or None.
    self.score_mod_t = score_mod_t
    # _visits: {"fwd": the forward's visits per query block (trimmed or
    # whole blocks), "kv": whole blocks, "q": the keys-outer backward's
    # visits per key block} (masks.Visits), or None: every block visited.
    self.mask_mod, self.visits = mask_mod, visits
    # {key block length: (score_mod, mask_mod, score_mod_t)} hoisted for the
    # trimmed visits shorter than block_k (visits["fwd"].groups).
    self.sized_mods = dict(sized_mods or {})
    self.sized_mods[block_k] = (score_mod, mask_mod, score_mod_t)
    self.bq, self.bk = block_q, block_k
    self.q_padded = _round_up(q_len, block_q)
    self.kv_padded = _round_up(kv_len, block_k)
    self.nq, self.nk = self.q_padded // block_q, self.kv_padded // block_k
    self.scale, self.causal, self.window = scale, causal, window
    # Without any masking every score is valid: the where/-inf bookkeeping
    # (a third of the forward's elementwise work) is skipped.
    self.needs_mask = (causal or window is not None or has_mask or has_lengths
                       or mask_mod is not None or self.kv_padded != kv_len)
    # A block mask's full blocks need no mask unless a dense mask or lengths
    # (which it does not see) may hide something inside them.
    self.full_unmasked = visits is not None and not (has_mask or has_lengths)
    # When key lengths are all that masks (padded sequences, no block mask):
    # key blocks below every sequence's length run unmasked, and those past
    # every sequence's length are never visited (key_bounds).
    self.length_bounds = length_bounds
    # The backward walks key blocks outer (each visiting its query blocks)
    # unless the forward's query-outer walk, over its trimmed visits, covers
    # fewer keys: a sliding window narrower than a key block needs more query
    # rows per key block than keys per query block (causal window of 256 keys
    # at 4,096 tokens, 256 x 512 blocks: 24 visits keys outer, 16 queries
    # outer); documents and causal attention trim their visits.
    self.queries_outer = visits is not None and _queries_outer(visits, block_k)

  def key_bounds(self, kv_lengths):
    """``(unmasked, live)``: the key blocks below every sequence's length
    (they need no mask) and those below the longest one's (the rest hold
    no valid key), as traced counts of key blocks."""
    lengths = jnp.clip(kv_lengths, 0, self.kv_len)
    return (jnp.min(lengths) // self.bk,
            jnp.minimum((jnp.max(lengths) + self.bk - 1) // self.bk, self.nk))

  def key_loops(self, qi, bounds=None):
    """``([(start, end, masked, length)], start_of, low_of)``: the loop
    counter's ranges for query block ``qi`` (whether each masks, and the key
    length of its visits), the map from counter to a key block's first
    position, and to the first key it counts (None when always its start).
    With a block mask (causal, window, mask_mod) they walk the forward's
    visits (``visits["fwd"]``, trimmed where ``_trim_pays``): per visit
    length, longest first, the full ones unmasked, then the partial ones,
    placed on a finer grain than the block (``masks.place_visits``); empty
    ones are never visited. The backward's queries-outer walk walks the same."""
    return self._loops(qi, "fwd", self.nk, self.bk, bounds)

  def query_loops(self, kj, bounds=None):
    """As ``key_loops`` for the backward: query blocks that see key block
    ``kj`` (whole blocks: ``length`` is ``bq``)."""
    return self._loops(kj, "q", self.nq, self.bq, bounds)

  def _loops(self, i, side, n, size, bounds=None):
    """``key_loops`` (side ``"fwd"``) or ``query_loops`` (``"q"``) of block
    ``i``; ``bounds``: ``(unmasked, end)`` counts from ``key_bounds``."""
    if self.visits is None:
      # Not over a single block: XLA removes a one-trip loop with static
      # bounds but keeps one with traced bounds, which ran one block of 2,048
      # keys 1.18x slower (a cond on the block, 1.11x).
      if bounds is not None and n > 1:
        unmasked, end = bounds
        return ([(0, unmasked, False, size), (unmasked, end, True, size)],
                lambda t: t * size, None)
      return [(0, n, self.needs_mask, size)], lambda t: t * size, None
    # Key-length bounds come only without a block mask (length_bounds).
    assert bounds is None
    visits = self.visits[side]
    starts = jnp.asarray(visits.starts)[i]
    start_of = lambda t: starts[t]
    low_of = None
    if visits.shifted:
      lows = jnp.asarray(visits.lows)[i]
      low_of = lambda t: lows[t]

    def bound(g, c):
      """A loop bound from ``visits.ranges``; static when the same for every
      outer block (a one-trip loop is then removed)."""
      values = visits.ranges[:, g, c]
      return int(values[0]) if (values == values[0]).all() else jnp.asarray(values)[i]

    loops = []
    for g, length in enumerate(visits.groups):
      begin, mid, end = bound(g, 0), bound(g, 1), bound(g, 2)
      if self.full_unmasked:
        loops += [(begin, mid, False, length), (mid, end, True, length)]
      else:
        loops.append((begin, end, True, length))
    return loops, start_of, low_of

  def mod_index(self, q_start, k_start, bk=None):
    """A block's index arrays for the mods (``masks.mod_index_grid``); padded
    positions clamped to the last valid one (they are masked or sliced off).
    ``bk``: the block's keys (a trimmed visit's), default ``self.bk``."""
    q_pos = jnp.minimum(q_start + jnp.arange(self.bq), self.q_len - 1)
    k_pos = jnp.minimum(k_start + jnp.arange(bk or self.bk), self.kv_len - 1)
    return masks.mod_index_grid(self.batch, self.heads, q_pos, k_pos)

  def apply_score_mod(self, s, q_start, k_start, consts, keys_major=False, bk=None):
    """``score_mod`` on a float32 ``[b, n, bq, bk]`` score block (keys-major:
    ``[b, n, bk, bq]``, through ``score_mod_t``)."""
    score_mod, _, score_mod_t = self.sized_mods[bk or self.bk]
    fn = score_mod_t if keys_major else score_mod
    mod = lambda score, *index: fn(score, *index, *consts)
    index = self.mod_index(q_start, k_start, bk)
    if keys_major:
      index = index[:2] + tuple(jnp.swapaxes(i, -1, -2) for i in index[2:])
    if self.has_bias:        # a -inf bias must keep its key hidden
      return mods.guarded_score_mod(mod, s, *index)
    return jnp.broadcast_to(jnp.asarray(mod(s, *index), s.dtype), s.shape)

  def valid(self, q_start, k_start, mask_blk, q_lengths, kv_lengths, mask_consts=(),
            q_low=None, k_low=None, bk=None):
    """Boolean ``[batch|1, heads|1, bq, bk]`` of visible (query, key) pairs;
    ``q_low`` / ``k_low``: positions below them are hidden (counted by the
    block before, ``masks.Visits.lows``); ``bk`` as in ``mod_index``."""
    q_pos = q_start + jnp.arange(self.bq)[:, None]
    k_pos = k_start + jnp.arange(bk or self.bk)[None, :]
    ok = k_pos < self.kv_len
    if k_low is not None:
      ok = ok & (k_pos >= k_low)
    if q_low is not None:
      ok = ok & (q_pos >= q_low)
    if self.causal:
      ok = ok & (k_pos <= q_pos)
    if self.window is not None:
      left, right = self.window
      ok = ok & (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    ok = ok[None, None]
    if kv_lengths is not None:
      ok = ok & (k_pos[None, None] < kv_lengths[:, None, None, None])
    if q_lengths is not None:
      ok = ok & (q_pos[None, None] < q_lengths[:, None, None, None])
    if mask_blk is not None:
      ok = ok & mask_blk
    if self.mask_mod is not None:
      mask_mod = self.sized_mods[bk or self.bk][1]
      ok = ok & jnp.asarray(mask_mod(*self.mod_index(q_start, k_start, bk), *mask_consts), bool)
    return ok

  def keep(self, q_start, k_start, seeds, bk=None):
    """Bool ``[batch|1, heads|1, bq, bk]``: the weights dropout keeps in a
    block (``dropout_keep`` of the absolute positions and the row
    ``batch * heads + head``), the same bits in the forward and backward
    (whatever the blocks: a pair's bits depend on its positions only)."""
    q_pos = q_start + jnp.arange(self.bq, dtype=jnp.int32)[:, None]
    k_pos = k_start + jnp.arange(bk or self.bk, dtype=jnp.int32)[None, :]
    row = None
    if not self.broadcast_dropout:
      row = jnp.arange(self.batch * self.heads, dtype=jnp.int32).reshape(
          self.batch, self.heads, 1, 1)
    keep = dropout_keep(seeds[0], seeds[1], q_pos, k_pos, row, self.keep_prob)
    return keep if keep.ndim == 4 else keep[None, None]

  def drop(self, x, keep):
    """``x`` with dropped weights zeroed, kept ones scaled by 1/keep_prob."""
    return jnp.where(keep, x * (1.0 / self.keep_prob), 0.0)


# Block products with grouped K/V heads. Queries and everything per query
# head are [b, n, ...]; keys and values are [b, h, ...] with n = h * g, the
# query heads of one K/V head adjacent (as jnp.repeat would lay them out).
# With g > 1 a group's queries share one matrix product with their K/V
# head's block, so K and V are never copied g times.

def _group(x, g):
  """``[b, n, t, d] -> [b, n // g, g, t, d]`` (a free reshape)."""
  return x.reshape(x.shape[0], x.shape[1] // g, g, *x.shape[2:])


def _ungroup(x):
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _per_head(spec_1, spec_g, a, b, g):
  """``einsum`` of a per-query-head operand with a per-K/V-head one,
  per-query-head result (``spec_1`` for g = 1, ``spec_g`` grouped)."""
  if g == 1:
    return jnp.einsum(spec_1, a, b, preferred_element_type=jnp.float32)
  return _ungroup(jnp.einsum(spec_g, _group(a, g), b, preferred_element_type=jnp.float32))


def _summed_over_group(spec_1, spec_g, a, b, g):
  """``einsum`` of two per-query-head operands summed into a per-K/V-head
  result (the gradients of K and V)."""
  if g == 1:
    return jnp.einsum(spec_1, a, b, preferred_element_type=jnp.float32)
  return jnp.einsum(spec_g, _group(a, g), _group(b, g), preferred_element_type=jnp.float32)


def _scores(st, qb, kb, bias_blk):
  """Scores of a block; ``qb`` arrives pre-multiplied by the scale."""
  s = _per_head("bnqd,bnkd->bnqk", "bhgqd,bhkd->bhgqk", qb, kb, st.groups)
  if bias_blk is not None:
    s = s + bias_blk.astype(jnp.float32)
  return s


def _walk(loops, body, carry):
  """Runs ``body(t, carry, masked, size)`` over each ``(start, end, masked,
  size)`` range of ``loops``."""
  for start, end, masked, size in loops:
    carry = lax.fori_loop(start, end, functools.partial(body, masked=masked, size=size), carry)
  return carry


def _forward(st: _Static, q, k, v, bias, mask, q_lengths, kv_lengths,
             score_consts=(), mask_consts=(), seeds=None):
  """Returns ``out [b, n, Tp, dv]`` (input dtype) and ``lse [b, n, Tp]`` (float32)."""
  b, n, _, _ = q.shape
  dv = v.shape[-1]
  key_bounds = st.key_bounds(kv_lengths) if st.length_bounds else None

  def query_block(qi):
    q_start = qi * st.bq
    qb = lax.dynamic_slice_in_dim(q, q_start, st.bq, axis=2)
    loops, key_start_of, key_low_of = st.key_loops(qi, key_bounds)

    def body(t, carry, masked, size):
      m, l, acc = carry
      k_start = key_start_of(t)
      kb = lax.dynamic_slice_in_dim(k, k_start, size, axis=2)
      vb = lax.dynamic_slice_in_dim(v, k_start, size, axis=2)
      s = _scores(st, qb, kb, _block(bias, q_start, st.bq, k_start, size))
      if st.score_mod is not None:
        s = st.apply_score_mod(s, q_start, k_start, score_consts, bk=size)
      if masked:
        ok = st.valid(q_start, k_start, _block(mask, q_start, st.bq, k_start, size),
                      q_lengths, kv_lengths, mask_consts,
                      k_low=None if key_low_of is None else key_low_of(t), bk=size)
        s = jnp.where(ok, s, _NEG_INF)
      m_new = jnp.maximum(m, s.max(-1))
      # Also on unmasked paths: a -inf bias can leave a row without a finite
      # score so far, and exp(-inf - (-inf)) would be NaN. A [b, n, bq]
      # select costs nothing beside the block's matmuls.
      m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])                  # masked -> exp(-inf) = 0
      correction = jnp.exp(m - m_safe)                    # m = -inf -> 0
      l = correction * l + p.sum(-1)      # the normaliser sees every weight
      if st.keep_prob is not None:
        p = st.drop(p, st.keep(q_start, k_start, seeds, bk=size))
      acc = correction[..., None] * acc + _per_head(
          "bnqk,bnkd->bnqd", "bhgqk,bhkd->bhgqd", p.astype(v.dtype), vb, st.groups)
      return m_new, l, acc

    init = (jnp.full((b, n, st.bq), _NEG_INF, jnp.float32),
            jnp.zeros((b, n, st.bq), jnp.float32),
            jnp.zeros((b, n, st.bq, dv), jnp.float32))
    m, l, acc = _walk(loops, body, init)
    has_key = l > 0
    out = jnp.where(has_key[..., None], acc / jnp.where(has_key, l, 1.0)[..., None], 0.0)
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), _NEG_INF)
    return out.astype(q.dtype), lse

  outs, lses = lax.map(query_block, jnp.arange(st.nq))     # [nq, b, n, bq, ...]
  out = jnp.moveaxis(outs, 0, 2).reshape(b, n, st.q_padded, dv)
  lse = jnp.moveaxis(lses, 0, 2).reshape(b, n, st.q_padded)
  return out, lse


def _backward(st: _Static, q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out,
              d_lse=None, score_consts=(), mask_consts=(), seeds=None):
  """Gradients wrt q, k, v (and bias, and the score_mod's parameters),
  recomputing probabilities block by block.

  ``d_lse`` (``[b, n, Tp]`` or None): the cotangent of the log-sum-exp.
  The score_mod's parameters (its hoisted consts flagged in
  ``st.score_params``) get ``sum over blocks of vjp(score_mod)(ds)``,
  accumulated in float32 at least; the others get None.

  With dropout (``D`` the block's keep mask over keep_prob) the output is
  ``(P * D) V``, so ``dV = (P * D)^T dO`` and ``dS = P * (D * dO V^T - delta)``;
  ``delta = rowsum(dO * out)`` as without dropout.
  """
  f32 = jnp.float32
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)     # [b, n, Tp]
  if d_lse is not None:
    delta = delta - d_lse.astype(f32)
  d_q = jnp.zeros(q.shape, f32)
  d_k = jnp.zeros(k.shape, f32)
  d_v = jnp.zeros(v.shape, f32)
  d_bias = None if bias is None else jnp.zeros(bias.shape, f32)
  param_at = [i for i, is_param in enumerate(st.score_params) if is_param]
  acc_dtype = lambda x: jnp.promote_types(x.dtype, f32)
  d_params = tuple(jnp.zeros(jnp.shape(score_consts[i]), acc_dtype(score_consts[i]))
                   for i in param_at)

  # Block layout. Keys-major [.., bk, bq] blocks let the products for dV and
  # dK take their left operand as stored (only dQ's needs a transposed one).
  # A score_mod runs keys-major in place when it is free of the axis order
  # (st.score_mod_t); its terms computed query-major and transposed would
  # cost a copy of the block each (causal + ALiBi at 2,048 tokens: 1.30x
  # causal forward+backward). A mod tied to the axis order keeps the blocks
  # query-major and the products transpose instead (1.17x).
  keys_major = st.score_mod is None or st.score_mod_t is not None
  if keys_major:
    lay = lambda x: jnp.swapaxes(x, -1, -2)        # query-major block -> layout
    row = lambda x: x[..., None, :]                 # per-query [.., bq] -> layout
    spec = {"s": ("bnqd,bnkd->bnkq", "bhgqd,bhkd->bhgkq"),
            "dv": ("bnkq,bnqd->bnkd", "bhgkq,bhgqd->bhkd"),
            "dq": ("bnkq,bnkd->bnqd", "bhgkq,bhkd->bhgqd")}
  else:
    lay = lambda x: x
    row = lambda x: x[..., :, None]
    spec = {"s": ("bnqd,bnkd->bnqk", "bhgqd,bhkd->bhgqk"),
            "dv": ("bnqk,bnqd->bnkd", "bhgqk,bhgqd->bhkd"),
            "dq": ("bnqk,bnkd->bnqd", "bhgqk,bhkd->bhgqd")}

  def modded(raw, params, q_start, k_start, bk):
    """The score_mod on a block in the layout, as a function of the parameters."""
    consts = list(score_consts)
    for i, p in zip(param_at, params):
      consts[i] = p.astype(jnp.result_type(score_consts[i]))
    return st.apply_score_mod(raw, q_start, k_start, consts, keys_major=keys_major, bk=bk)

  def reduce_to(x, shape):
    """Sums a ``[b, n, bq, bk]`` block over the dims a compact array broadcasts."""
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x

  def block_grads(q_start, k_start, qb, kb, vb, dob, lse_b, delta_b, d_params, masked,
                  q_low=None, k_low=None):
    """One block's terms: ``(d_qb [b, n, bq, d], d_kb [b, h, bk, d], d_vb,
    the bias's gradient block or None, d_params)``, float32; ``bk``, the
    block's keys, is ``kb``'s (a trimmed visit's or ``st.bk``)."""
    bk = kb.shape[2]
    s_t = _per_head(*spec["s"], qb, kb, st.groups)              # in the block layout
    bias_blk = _block(bias, q_start, st.bq, k_start, bk)
    if bias_blk is not None:
      s_t = s_t + lay(bias_blk).astype(f32)
    if st.score_mod is not None:
      # The mod is recomputed, and its vjp carries ds back to the raw
      # score (for dq, dk, d bias) and to its parameters.
      params = tuple(score_consts[i].astype(acc_dtype(score_consts[i])) for i in param_at)
      s_t, mod_vjp = jax.vjp(functools.partial(modded, q_start=q_start, k_start=k_start,
                                               bk=bk), s_t, params)
    # Rows with no visible key (lse = -inf, from masks or a -inf bias) get
    # probabilities exp(s - 0) with s = -inf or masked below: zero, not NaN.
    lse_safe = jnp.where(lse_b == _NEG_INF, 0.0, lse_b)
    if masked:
      ok = st.valid(q_start, k_start, _block(mask, q_start, st.bq, k_start, bk),
                    q_lengths, kv_lengths, mask_consts, q_low=q_low, k_low=k_low, bk=bk)
      p_t = jnp.where(lay(ok), jnp.exp(s_t - row(lse_safe)), 0.0)
    else:
      p_t = jnp.exp(s_t - row(lse_safe))
    dp_t = _per_head(*spec["s"], dob, vb, st.groups)
    pd_t = p_t
    if st.keep_prob is not None:
      keep_t = lay(st.keep(q_start, k_start, seeds, bk=bk))
      pd_t, dp_t = st.drop(p_t, keep_t), st.drop(dp_t, keep_t)
    d_vb = _summed_over_group(*spec["dv"], pd_t.astype(dob.dtype), dob, st.groups)
    ds_t = p_t * (dp_t - row(delta_b))
    if st.score_mod is not None:
      ds_t, d_params_blk = mod_vjp(ds_t)
      d_params = tuple(a + b for a, b in zip(d_params, d_params_blk))
    d_qb = _per_head(*spec["dq"], ds_t.astype(kb.dtype), kb, st.groups)
    d_kb = _summed_over_group(*spec["dv"], ds_t.astype(qb.dtype), qb, st.groups)  # qb pre-scaled
    grad = None if bias is None else reduce_to(lay(ds_t), bias.shape)
    return d_qb, d_kb, d_vb, grad, d_params

  def add_at(x, part, start):
    """``x[:, :, start:start + len(part)] += part``."""
    size = part.shape[2]
    return lax.dynamic_update_slice_in_dim(
        x, lax.dynamic_slice_in_dim(x, start, size, axis=2) + part, start, axis=2)

  def add_bias(d_bias, grad, q_start, k_start):
    if d_bias is None:
      return None
    starts = (0, 0, q_start if d_bias.shape[2] != 1 else 0,
              k_start if d_bias.shape[3] != 1 else 0)
    return lax.dynamic_update_slice(
        d_bias, lax.dynamic_slice(d_bias, starts, grad.shape) + grad, starts)

  # Read once, outside the loops (key_block's bounds).
  key_bounds = st.key_bounds(kv_lengths) if st.length_bounds else None
  query_rows = lambda q_start: tuple(lax.dynamic_slice_in_dim(x, q_start, st.bq, axis=2)
                                     for x in (q, d_out, lse, delta))
  key_rows = lambda k_start, bk=st.bk: tuple(lax.dynamic_slice_in_dim(x, k_start, bk, axis=2)
                                             for x in (k, v))

  def key_block(kj, carry):
    """Keys outer: the query blocks that see key block ``kj``; dK and dV
    carried, dQ added in place."""
    d_q, d_k, d_v, d_bias, d_params = carry
    k_start = kj * st.bk
    kb, vb = key_rows(k_start)
    bounds = None
    if key_bounds is not None:      # every query block of this key block, or none
      unmasked, live = key_bounds
      bounds = (jnp.where(kj < unmasked, st.nq, 0), jnp.where(kj < live, st.nq, 0))
    loops, query_start_of, query_low_of = st.query_loops(kj, bounds)

    def visit(t, inner, masked, size):        # size: bq, query visits are whole blocks
      d_q, d_kb, d_vb, d_bias, d_params = inner
      q_start = query_start_of(t)
      qb, dob, lse_b, delta_b = query_rows(q_start)
      d_qb, dk, dv, grad, d_params = block_grads(
          q_start, k_start, qb, kb, vb, dob, lse_b, delta_b, d_params, masked,
          q_low=None if query_low_of is None else query_low_of(t))
      return (add_at(d_q, d_qb, q_start), d_kb + dk, d_vb + dv,
              add_bias(d_bias, grad, q_start, k_start), d_params)

    inner = (d_q, jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32), d_bias, d_params)
    d_q, d_kb, d_vb, d_bias, d_params = _walk(loops, visit, inner)
    d_k = lax.dynamic_update_slice_in_dim(d_k, d_kb, k_start, axis=2)
    d_v = lax.dynamic_update_slice_in_dim(d_v, d_vb, k_start, axis=2)
    return d_q, d_k, d_v, d_bias, d_params

  def query_block(qi, carry):
    """Queries outer: the forward's key visits of query block ``qi`` (trimmed
    as the forward's); dQ carried, dK and dV added in place."""
    d_q, d_k, d_v, d_bias, d_params = carry
    q_start = qi * st.bq
    qb, dob, lse_b, delta_b = query_rows(q_start)
    loops, key_start_of, key_low_of = st.key_loops(qi)

    def visit(t, inner, masked, size):
      d_qb, d_k, d_v, d_bias, d_params = inner
      k_start = key_start_of(t)
      kb, vb = key_rows(k_start, size)
      dq, d_kb, d_vb, grad, d_params = block_grads(
          q_start, k_start, qb, kb, vb, dob, lse_b, delta_b, d_params, masked,
          k_low=None if key_low_of is None else key_low_of(t))
      return (d_qb + dq, add_at(d_k, d_kb, k_start), add_at(d_v, d_vb, k_start),
              add_bias(d_bias, grad, q_start, k_start), d_params)

    inner = (jnp.zeros(qb.shape[:3] + (q.shape[-1],), f32), d_k, d_v, d_bias, d_params)
    d_qb, d_k, d_v, d_bias, d_params = _walk(loops, visit, inner)
    d_q = lax.dynamic_update_slice_in_dim(d_q, d_qb, q_start, axis=2)
    return d_q, d_k, d_v, d_bias, d_params

  carry = (d_q, d_k, d_v, d_bias, d_params)
  if st.queries_outer:
    d_q, d_k, d_v, d_bias, d_params = lax.fori_loop(0, st.nq, query_block, carry)
  else:
    d_q, d_k, d_v, d_bias, d_params = lax.fori_loop(0, st.nk, key_block, carry)
  d_score_consts = [None] * len(score_consts)
  for i, g in zip(param_at, d_params):
    d_score_consts[i] = g.astype(jnp.result_type(score_consts[i]))
  return d_q, d_k, d_v, d_bias, tuple(d_score_consts)


def _make_attention(st: _Static, with_lse: bool = False):
  """A custom_vjp attention for one static setting (padded heads-major inputs).

  With ``with_lse`` it returns ``(out, lse)`` and the backward takes the
  log-sum-exp's cotangent too: ``d lse_i / d s_ij = p_ij``, so a cotangent
  ``g_i`` adds ``g_i p_ij`` to ``ds_ij``, the same as lowering ``delta_i`` by
  ``g_i``.
  """

  @jax.custom_vjp
  def attend(q, k, v, bias, mask, q_lengths, kv_lengths, score_consts, mask_consts, seeds):
    out, lse = _forward(st, q, k, v, bias, mask, q_lengths, kv_lengths,
                        score_consts, mask_consts, seeds)
    return (out, lse) if with_lse else out

  def fwd(q, k, v, bias, mask, q_lengths, kv_lengths, score_consts, mask_consts, seeds):
    out, lse = _forward(st, q, k, v, bias, mask, q_lengths, kv_lengths,
                        score_consts, mask_consts, seeds)
    res = (q, k, v, bias, mask, q_lengths, kv_lengths, score_consts, mask_consts, seeds,
           out, lse)
    return ((out, lse) if with_lse else out), res

  def bwd(res, cotangent):
    (q, k, v, bias, mask, q_lengths, kv_lengths, score_consts, mask_consts, seeds,
     out, lse) = res
    d_out, d_lse = cotangent if with_lse else (cotangent, None)
    d_q, d_k, d_v, d_bias, d_score_consts = _backward(
        st, q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, d_out, d_lse,
        score_consts, mask_consts, seeds)
    cast = lambda g, x: None if g is None else g.astype(x.dtype)
    # mask_mod consts get no cotangent: a boolean mask is flat in them.
    return (cast(d_q, q), cast(d_k, k), cast(d_v, v), cast(d_bias, bias),
            None, None, None, d_score_consts, None, None)

  attend.defvjp(fwd, bwd)
  return attend


# A block's float32 scores are [rows, heads, block_q, block_k]: with many
# sequences (a training batch) they outgrow the caches the block loop is
# meant to stay in, so the rows go through the loops in passes of at most
# this many score bytes per block. Measured on this project's 2-core AMD EPYC
# (benchmarks/README.md), forward+backward of 32 sequences x 8 heads, head_dim
# 32: 1.42x faster at 256 tokens (4 rows per pass) and 1.44x at 2,048 (1 row)
# than one pass over all 32.
PASS_BYTES = 4 << 20


def _rows_per_pass(rows: int, heads: int, block_q: int, block_k: int) -> int:
  """The largest divisor of ``rows`` whose blocks stay within ``PASS_BYTES``."""
  fit = max(1, PASS_BYTES // (heads * block_q * block_k * 4))
  return max(d for d in range(1, min(rows, fit) + 1) if rows % d == 0)


def _in_passes(attend, rows: int, flat: int, q, k, v, bias, mask, q_lengths, kv_lengths):
  """``attend`` over ``flat`` batch rows in ``lax.map`` passes of ``rows``;
  a bias or mask shared by every row (leading dim 1) is passed whole."""
  per_row = lambda x: x is not None and x.shape[0] == flat
  split = lambda x: x.reshape(flat // rows, rows, *x.shape[1:])
  args = (q, k, v, bias, mask, q_lengths, kv_lengths)
  xs = tuple(split(x) if per_row(x) else None for x in args)

  def one_pass(chunk):
    call = [c if per_row(x) else x for x, c in zip(args, chunk)]
    return attend(*call, (), (), None)

  merge = lambda y: y.reshape(flat, *y.shape[2:])
  return jax.tree.map(merge, lax.map(one_pass, xs))


def blockwise_attention(query, key, value, bias=None, mask=None, *,
                        scale: Optional[float] = None, is_causal: bool = False,
                        local_window_size=None, q_lengths=None, kv_lengths=None,
                        return_residual: bool = False,
                        score_mod=None, mask_mod=None,
                        dropout_rate: float = 0.0, dropout_rng=None,
                        broadcast_dropout: bool = True,
                        block_q: Optional[int] = None,
                        block_k: Optional[int] = None):
  """Flash-style attention; same arguments and shapes as ``reference_attention``.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``.
    value: ``[batch..., kv_length, kv_heads, value_dim]``; with fewer K/V
      heads than query heads (grouped-query attention) they are never
      repeated: each block's products run per group of query heads.
    bias / mask: broadcastable to ``[batch..., heads, q_length, kv_length]``;
      kept in their compact (broadcast) shape and sliced per block.
    q_lengths / kv_lengths: int ``[batch...]``, valid prefix lengths: padding
      masks in O(length) memory (rows past ``q_lengths`` return zeros).
    return_residual: also return the float32 log-sum-exp of each query's
      scores ``[batch..., q_length, heads]`` (``-inf`` where a query has no
      key), differentiable.
    score_mod / mask_mod: FlexAttention-style hooks (``kernels.mods``),
      called per ``[batch, heads, block_q, block_k]`` block in the forward and
      the backward; gradients reach the arrays a ``score_mod`` closes over.
      A ``mask_mod`` of indices and concrete arrays only gets a static block
      mask: empty blocks skipped, full ones unmasked.
    dropout_rate / dropout_rng / broadcast_dropout: dropout on the weights
      (Flax's meaning: kept weights scaled by ``1 / (1 - rate)``; with
      ``broadcast_dropout`` one mask for every sequence and head), the mask
      ``kernels.dropout.dropout_keep`` of seeds drawn from ``dropout_rng``
      (the Pallas kernel's mask), regenerated per block in the backward.
    block_q / block_k: block sizes (clipped to the padded lengths). When
      neither is given: the ones ``benchmarks/tune.py`` measured fastest on
      this CPU for the shape class (``kernels.tuning``), else
      ``DEFAULT_BLOCKS``: 128 x 1024, or 256 x 512 for causal, windowed or
      ``mask_mod`` attention.

  Returns:
    ``[batch..., q_length, heads, value_dim]`` in the query dtype (and the
    residual).
  """
  shape = checks.check_inputs(query, key, value, mask, bias, who="blockwise_attention")
  batch = shape.batch
  flat = math.prod(batch) if batch else 1
  checks.check_lengths("blockwise_attention", "q_lengths", q_lengths, batch)
  checks.check_lengths("blockwise_attention", "kv_lengths", kv_lengths, batch)
  banded = is_causal or local_window_size is not None or mask_mod is not None
  if block_q is None and block_k is None:
    block_q, block_k = (tuning.blocks(banded, shape.kv_length, shape.head_dim)
                        or (None, None))
  block_q = DEFAULT_BLOCKS[banded][0] if block_q is None else block_q
  block_k = DEFAULT_BLOCKS[banded][1] if block_k is None else block_k
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"blockwise_attention: block sizes must be positive, got {block_q}, {block_k}")
  block_q = min(block_q, _round_up(shape.q_length, 8))
  block_k = min(block_k, _round_up(shape.kv_length, 8))
  window = None if local_window_size is None else _window_sides(local_window_size)
  keep_prob, seeds = None, None
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("blockwise_attention: dropout_rate > 0 needs dropout_rng")
    if dropout_rate >= 1.0:
      raise ValueError(f"blockwise_attention: dropout_rate must be below 1, got {dropout_rate}")
    keep_prob, seeds = 1.0 - float(dropout_rate), dropout_seed(dropout_rng)
  # Mods are traced once on block-shaped stand-ins, and every array they
  # close over becomes an explicit input of the custom_vjp.
  index_spec = tuple(jax.ShapeDtypeStruct(s, jnp.int32) for s in (
      (flat, 1, 1, 1), (1, shape.heads, 1, 1), (1, 1, block_q, 1), (1, 1, 1, block_k)))
  score_fn, score_consts, score_params, score_fn_t = None, (), (), None
  if score_mod is not None:
    score_spec = jax.ShapeDtypeStruct((flat, shape.heads, block_q, block_k), jnp.float32)
    score_fn, score_consts = mods.hoist(score_mod, score_spec, *index_spec)
    score_params = [isinstance(c, jax.core.Tracer) and jnp.issubdtype(c.dtype, jnp.inexact)
                    for c in score_consts]
    score_fn_t = mods.hoist_keys_major(score_mod, score_consts, score_spec, *index_spec)
  mask_fn, mask_consts, table = None, (), None
  grain_q, grain_k = _grain(block_q), _grain(block_k)
  if mask_mod is not None:
    mask_fn, mask_consts = mods.hoist(mask_mod, *index_spec)
    table = masks.block_mask(mask_mod, flat, shape.heads, shape.q_length, shape.kv_length,
                             grain_q, grain_k, is_causal=is_causal, window=window)
  if table is None and (is_causal or window is not None):
    # Causal and windowed attention walk the same block mask as a mask_mod;
    # with a mod of traced arrays (no static block mask) the band's full
    # blocks still need the mod's mask.
    table = masks.band_block_mask(shape.q_length, shape.kv_length, grain_q, grain_k,
                                  is_causal=is_causal, window=window,
                                  exact=mask_mod is None)
  visits = None if table is None else _visits(table.state, block_q, block_k, grain_q,
                                               grain_k, shape.q_length, shape.kv_length)
  sized_mods = {}
  for size in () if visits is None else visits["fwd"].groups:
    if size == block_k:
      continue
    # Trimmed visits run the mods on shorter key blocks: each hoisted again
    # at that length, with the same consts, or no trimming.
    spec = index_spec[:3] + (jax.ShapeDtypeStruct((1, 1, 1, size), jnp.int32),)
    scores = jax.ShapeDtypeStruct((flat, shape.heads, block_q, size), jnp.float32)
    score_at = score_fn and mods.rehoist(score_mod, score_consts, scores, *spec)
    score_t_at = score_fn_t and mods.hoist_keys_major(score_mod, score_consts, scores, *spec)
    mask_at = mask_fn and mods.rehoist(mask_mod, mask_consts, *spec)
    if (score_fn and not score_at) or (mask_fn and not mask_at) or (score_fn_t and not score_t_at):
      visits, sized_mods = dict(visits, fwd=visits["kv"]), {}
      break
    sized_mods[size] = (score_at, mask_at, score_t_at)
  st = _Static(shape.q_length, shape.kv_length, block_q, block_k,
               shape.head_dim ** -0.5 if scale is None else scale, is_causal, window,
               has_mask=mask is not None,
               has_lengths=q_lengths is not None or kv_lengths is not None,
               batch=flat, heads=shape.heads, has_bias=bias is not None,
               score_mod=score_fn, score_params=score_params, mask_mod=mask_fn, visits=visits,
               groups=shape.heads // shape.kv_heads, keep_prob=keep_prob,
               broadcast_dropout=broadcast_dropout, score_mod_t=score_fn_t,
               length_bounds=(kv_lengths is not None and q_lengths is None and mask is None
                              and mask_fn is None and visits is None),
               sized_mods=sized_mods)

  # The scale goes on q (length x dim) rather than on every score block;
  # autodiff of this multiply scales dq, so the custom backward never does.
  q = heads_major((query.astype(jnp.float32) * st.scale).astype(query.dtype), len(batch),
                  st.q_padded)
  k = heads_major(key, len(batch), st.kv_padded)                    # [b, kv_heads, ...]
  v = heads_major(value, len(batch), st.kv_padded)
  q_pad, kv_pad = st.q_padded - shape.q_length, st.kv_padded - shape.kv_length
  mask_c = _compact(mask, batch, False, q_pad, kv_pad)
  bias_c = _compact(bias, batch, 0.0, q_pad, kv_pad)
  if bias_c is not None:
    bias_c = bias_c.astype(jnp.promote_types(bias_c.dtype, jnp.float32))
  as_flat = lambda x: None if x is None else jnp.asarray(x, jnp.int32).reshape(flat)

  attend = _make_attention(st, return_residual)
  rows = _rows_per_pass(flat, shape.heads, block_q, block_k)
  if rows < flat and score_fn is None and mask_fn is None and keep_prob is None:
    out = _in_passes(attend, rows, flat, q, k, v, bias_c, mask_c, as_flat(q_lengths),
                     as_flat(kv_lengths))
  else:
    # Mods and dropout see absolute batch indices: one pass over every row.
    out = attend(q, k, v, bias_c, mask_c, as_flat(q_lengths), as_flat(kv_lengths),
                 tuple(score_consts), tuple(mask_consts), seeds)
  out, lse = out if return_residual else (out, None)
  out = jnp.swapaxes(out[:, :, :shape.q_length], 1, 2)              # [b, t, n, dv]
  out = out.reshape(batch + out.shape[1:])
  if lse is None:
    return out
  lse = jnp.swapaxes(lse[:, :, :shape.q_length], 1, 2)              # [b, t, n]
  return out, lse.reshape(batch + lse.shape[1:])
