"""Flash attention written in Pallas, for GPU (Triton) and TPU (Mosaic).

One program per ``(batch, head, query block)`` keeps its query block, running
max, normaliser and output in fast memory while it walks the key blocks
(FlashAttention-2 forward). The backward pass is two kernels: one per key
block accumulates ``dK`` and ``dV`` over the query blocks, one per query block
accumulates ``dQ`` over the key blocks; both recompute the probabilities from
the saved log-sum-exp, so memory stays linear in the length.

Supported: causal, sliding window, key padding by ``kv_lengths``, dropout
(a counter-based hash mask, regenerated in the backward), an additive bias
(read per block; its gradient is the score gradient). Dense boolean masks
are not (the registry sends such calls to another kernel, and says so in the
log).

One kernel body, three targets (``target=``), chosen per *lowering* platform
when not given (``jax.lax.platform_dependent``), so one jitted or exported
function carries the right program for each platform:

* ``"triton"`` on GPU. Selected explicitly by its compiler parameters: the
  jax default on GPU is Mosaic GPU, which targets Hopper only.
* ``"tpu"`` (Mosaic TPU). TPU tiles are 8 x 128: per-row statistics (the
  log-sum-exp, ``delta``) are stored broadcast over 128 lanes, blocks are
  multiples of 128, head dims are padded to 128 lanes, and the key lengths
  live whole in scalar memory (SMEM).
* ``"interpret"`` on CPU: Pallas's interpreter runs the GPU layout, which is
  how the tests check the kernel against the reference. ``"tpu_interpret"``
  runs the TPU layout in the TPU interpreter on CPU.

Masked scores use a large finite negative rather than ``-inf``: Triton's
``exp`` of ``-inf - (-inf)`` is NaN, and a finite value keeps fully masked rows
at exactly zero through the explicit ``where`` on the probabilities.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from attention_lab.kernels import checks
from attention_lab.kernels import fused_mods
from attention_lab.kernels import masks
from attention_lab.kernels.dropout import dropout_keep
from attention_lab.kernels.dropout import dropout_seed
from attention_lab.kernels.masks import _window_sides
from attention_lab.kernels.reference import heads_major
from attention_lab.kernels.reference import repeat_kv_heads

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
TPU_BLOCK = 128        # TPU tiles: 8 sublanes x 128 lanes
TPU_LANES = 128
TARGETS = ("interpret", "triton", "tpu", "tpu_interpret")
# What automatic dispatch lets the kernel's blocks take of a TPU core's VMEM:
# a v4 core's whole VMEM (pltpu.get_tpu_info_for_chip; v5e and v6e have 128
# MiB, but the kernel sets no vmem_limit_bytes above Mosaic's default scoped
# limit, and that default is not verified on a chip here). Each kernel
# holds some operands for the whole sequence (K and V in the forward and dQ
# kernels; Q, dO and the row statistics in dK/dV), double-buffered.
TPU_VMEM_BUDGET = 16 * 2 ** 20
_MASKED = -1e30  # finite: see module docstring


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class _Setting:
  """Static facts of one call, shared by the three kernels."""

  def __init__(self, q_len, kv_len, block_q, block_k, scale, causal, window, tpu,
               keep_prob=None, broadcast_dropout=True, heads=1, bias_shape=None,
               score_split=None, mask_split=None, block_table=False, has_lengths=False):
    self.q_len, self.kv_len = q_len, kv_len
    # A static mask_mod's block mask (masks.block_mask) as kernel inputs:
    # each program visits only the blocks it needs (empty ones skipped).
    self.block_table = block_table
    # score_mod / mask_mod split at the block (fused_mods.Split), or None.
    self.score_split, self.mask_split = score_split, mask_split
    # Dropout on the weights: None, or the probability of keeping one.
    self.keep_prob, self.broadcast_dropout, self.heads = keep_prob, broadcast_dropout, heads
    # A dense bias [bias_batch, bias_heads, Tp, Sp] (each 1 or full), or None.
    self.bias_shape = bias_shape
    # Whether the backward writes the bias's gradient: set by ``for_backward``,
    # the only setting the backward kernels run with.
    self.bias_grad = False
    self.bq, self.bk = block_q, block_k
    self.q_padded, self.kv_padded = _round_up(q_len, block_q), _round_up(kv_len, block_k)
    self.nq, self.nk = self.q_padded // block_q, self.kv_padded // block_k
    self.scale, self.causal, self.window = scale, causal, window
    self.tpu = tpu
    # Whether key lengths were given: a block mask's full blocks may then
    # hold padded keys (the band's full blocks are bounded by the lengths).
    self.has_lengths = has_lengths
    # Per-row statistics are stored [.., length, lanes]: 128 lanes on TPU
    # (a lane-dense store), one elsewhere.
    self.lanes = TPU_LANES if tpu else 1

  def for_backward(self, bias_grad: bool, score_grads) -> "_Setting":
    """This setting for the backward kernels, writing cotangents only for
    what is differentiated: the bias (``bias_grad``; its gradient is a
    ``[b, n, Tp, Sp]`` float32 array) and the score_mod values whose indices
    are in ``score_grads`` (a fixed relative-position table's tiles are
    ``[b, n, nq, nk, bq, bk]``)."""
    st = copy.copy(self)
    st.bias_grad = bool(self.bias_shape) and bias_grad
    if self.score_split is not None:
      values = [dataclasses.replace(v, grad=v.grad and i in score_grads)
                for i, v in enumerate(self.score_split.values)]
      st.score_split = dataclasses.replace(self.score_split, values=values)
    return st

  def key_blocks(self, qi):
    lo, hi = 0, self.nk
    if self.causal:
      hi = jnp.minimum(hi, (qi * self.bq + self.bq - 1) // self.bk + 1)
    if self.window is not None:
      left, right = self.window
      lo = jnp.maximum(lo, (qi * self.bq - left) // self.bk)
      hi = jnp.minimum(hi, (qi * self.bq + self.bq - 1 + right) // self.bk + 1)
    return jnp.maximum(lo, 0), hi

  def query_blocks(self, kj):
    lo, hi = 0, self.nq
    if self.causal:
      lo = jnp.maximum(lo, (kj * self.bk) // self.bq)
    if self.window is not None:
      left, right = self.window
      lo = jnp.maximum(lo, (kj * self.bk - right) // self.bq)
      hi = jnp.minimum(hi, (kj * self.bk + self.bk - 1 + left) // self.bq + 1)
    return jnp.maximum(lo, 0), hi

  def visible(self, q_start, k_start, kv_valid):
    """``[bq, bk]`` bool: the key exists, is unpadded, and is in the band."""
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 1)
    ok = k_pos < kv_valid
    if self.causal:
      ok = ok & (k_pos <= q_pos)
    if self.window is not None:
      left, right = self.window
      ok = ok & (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    return ok

  def dropout_state(self, seed_ref):
    """Read at the kernel's top level (program ids cannot be read inside its
    loops): the seeds and the (sequence, head) row of this program."""
    if self.keep_prob is None:
      return None
    row = None if self.broadcast_dropout else pl.program_id(0) * self.heads + pl.program_id(1)
    return seed_ref[0], seed_ref[1], row

  def drop(self, x, dropout, q_start, k_start):
    """``x`` with dropped weights zeroed and kept ones scaled by 1/keep_prob
    (see ``dropout_keep``); ``dropout`` is ``dropout_state``'s."""
    if dropout is None:
      return x
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (self.bq, self.bk), 1)
    keep = dropout_keep(*dropout[:2], q_pos, k_pos, dropout[2], self.keep_prob)
    return jnp.where(keep, x * (1.0 / self.keep_prob), 0.0)

  @property
  def n_score(self):
    return len(self.score_split.values) if self.score_split else 0

  @property
  def n_mask(self):
    return len(self.mask_split.values) if self.mask_split else 0

  def grads_in(self, kernel):
    """Indices of the score_mod values whose cotangents ``kernel`` ("dq" or
    "dkdv") sums: per key column in dK/dV (its programs own a key block),
    the rest in dQ (they own a query block)."""
    if self.score_split is None:
      return []
    values = self.score_split.values
    return [i for i in self.score_split.grads if values[i].per_k == (kernel == "dkdv")]

  @property
  def unmasked_full(self):
    """Whether full blocks (every pair visible) run without the mask: not
    with a dense bias (a -inf in it must still hide its key), nor with a
    mask_mod that has no block table (it may hide pairs in any block)."""
    if self.bias_shape or (self.mask_split is not None and not self.block_table):
      return False
    return not (self.block_table and self.has_lengths)

  def full_keys(self, qi, kv_valid):
    """``[lo, hi)``: key blocks in which every query of block ``qi`` sees
    every key (below ``kv_valid``, inside the causal / window band)."""
    q0, q1 = qi * self.bq, qi * self.bq + self.bq - 1
    lo, hi = 0, kv_valid // self.bk
    if self.causal:                        # last key <= first query
      hi = jnp.minimum(hi, (q0 + 1) // self.bk)
    if self.window is not None:
      left, right = self.window
      lo = jnp.maximum(lo, -((left - q1) // self.bk))     # first key >= last query - left
      hi = jnp.minimum(hi, (q0 + right + 1) // self.bk)   # last key <= first query + right
    return lo, hi

  def full_queries(self, kj, kv_valid):
    """``[lo, hi)``: query blocks whose every query sees every key of block
    ``kj`` (none when the block holds keys past ``kv_valid``)."""
    k0, k1 = kj * self.bk, kj * self.bk + self.bk - 1
    lo, hi = 0, jnp.where(k1 < kv_valid, self.nq, 0)
    if self.causal:                        # first query >= last key
      lo = jnp.maximum(lo, -(-k1 // self.bq))
    if self.window is not None:
      left, right = self.window
      lo = jnp.maximum(lo, -((right - k1) // self.bq))    # first query >= last key - right
      hi = jnp.minimum(hi, (k0 + left + 1) // self.bq)    # last query <= first key + left
    return lo, hi

  def visit(self, over, i, table_refs, body, init, kv_valid):
    """``fori_loop`` of ``body(block, carry, masked)`` over the key blocks
    query block ``i`` needs (``over="keys"``), or the query blocks that need
    key block ``i`` (``"queries"``): from the block table when there is one,
    else the causal / window band. Full blocks run with ``masked=False``
    when ``unmasked_full``: on the band's or the table's full blocks."""
    unmasked = lambda t, carry: body(t, carry, False)
    masked = lambda t, carry: body(t, carry, True)
    if self.block_table:
      order, count, full = (table_refs[:3] if over == "keys" else table_refs[3:])
      at = lambda step: (lambda t, carry: step(order[i, t], carry))
      mid = full[i] if self.unmasked_full else 0
      init = lax.fori_loop(0, mid, at(unmasked), init)
      return lax.fori_loop(mid, count[i], at(masked), init)
    lo, hi = self.key_blocks(i) if over == "keys" else self.query_blocks(i)
    if not self.unmasked_full:
      return lax.fori_loop(lo, hi, masked, init)
    f_lo, f_hi = self.full_keys(i, kv_valid) if over == "keys" else self.full_queries(i, kv_valid)
    f_lo = jnp.clip(f_lo, lo, hi)
    f_hi = jnp.clip(f_hi, f_lo, hi)
    init = lax.fori_loop(lo, f_lo, masked, init)
    init = lax.fori_loop(f_lo, f_hi, unmasked, init)
    return lax.fori_loop(f_hi, hi, masked, init)

  def scores(self, q, k, bias, qi, kj, kv_valid, masked, score_refs, mask_refs,
             with_vjp=False):
    """Block ``(qi, kj)``'s scores as all three kernels start from them:
    ``(s, ok, back)`` of ``mods`` over ``q k^T * scale`` plus the ``bias``
    tile (or None). ``ok`` is None exactly for a block visited unmasked."""
    ok = self.visible(qi * self.bq, kj * self.bk, kv_valid) if masked else None
    s = _qk(q, k) * self.scale
    if bias is not None:
      s = s + bias.astype(jnp.float32)
    return self.mods(s, ok, qi, kj, score_refs, mask_refs, with_vjp=with_vjp)

  def mods(self, s, ok, qi, kj, score_refs, mask_refs, with_vjp=False):
    """The mods on one ``[bq, bk]`` block: ``(s, ok, back)`` with ``ok``
    narrowed by the mask_mod, ``s`` the score_mod's score and ``back`` (with
    ``with_vjp``) its vjp (``fused_mods.Split.inside_vjp``). ``ok`` None: a
    full block (the mask_mod is true on all of it; there is no bias)."""
    q_start, k_start = qi * self.bq, kj * self.bk
    if self.mask_split is not None and ok is not None:
      values = _block_values(self, self.mask_split, mask_refs, qi, kj)
      ok = ok & self.mask_split.inside(None, q_start, k_start, values)
    back = None
    if self.score_split is not None:
      if self.bias_shape:
        # A key hidden by a -inf bias stays hidden; the mod sees 0 there.
        hidden = s == -jnp.inf
        ok = ok & ~hidden
        s = jnp.where(hidden, 0.0, s)
      values = _block_values(self, self.score_split, score_refs, qi, kj)
      if with_vjp:
        s, back = self.score_split.inside_vjp(s, q_start, k_start, values)
      else:
        s = self.score_split.inside(s, q_start, k_start, values)
    return s, ok, back

  def rows(self, i, size):
    """A dynamic slice of ``size`` rows starting at block ``i`` (aligned)."""
    return pl.ds(pl.multiple_of(i * size, size), size)

  def kv_valid(self, len_ref):
    # TPU: the whole lengths vector sits in SMEM; elsewhere each program
    # gets its own one-element block.
    return len_ref[pl.program_id(0)] if self.tpu else len_ref[0]

  def store_rows(self, ref, column):
    """Stores a ``[bq, 1]`` statistic into its ``[bq, lanes]`` block."""
    ref[...] = jnp.broadcast_to(column, (column.shape[0], self.lanes))


def _block_values(st, split, refs, qi, kj):
  """A program's ``[a, c]`` block of each of ``split``'s values, read from
  their ``[nq | 1, nk | 1, a, c]`` refs, or for a value of the relative
  position from its ``[offsets, 1, bq, bk]`` ref at the pair's offset tile."""
  def one(v, ref):
    if v.per_offset:
      return ref[fused_mods.offset_index(qi, kj, st.nq, st.bq, st.bk), 0]
    return ref[qi if v.per_q else 0, kj if v.per_k else 0]
  return [one(v, ref) for v, ref in zip(split.values, refs)]


def _take(rest, n):
  return [rest.pop(0) for _ in range(n)]


def _hide(p, ok):
  """Zero weight where ``ok`` is False (None: an unmasked block, as it is)."""
  return p if ok is None else jnp.where(ok, p, 0.0)


def _qk(q, k):
  """``q [m, d] @ k[n, d]^T -> [m, n]`` in float32."""
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tq(a, b):
  """``a[m, n]^T @ b[m, d] -> [n, d]`` in float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(*refs, st: _Setting):
  len_ref, seed_ref, q_ref, k_ref, v_ref, *rest = refs
  bias_ref = rest.pop(0) if st.bias_shape else None
  score_refs, mask_refs = _take(rest, st.n_score), _take(rest, st.n_mask)
  table_refs = _take(rest, 6 if st.block_table else 0)
  o_ref, lse_ref = rest
  qi = pl.program_id(2)
  kv_valid = st.kv_valid(len_ref)
  dropout = st.dropout_state(seed_ref)
  q = q_ref[...]
  dv = v_ref.shape[-1]

  def body(kj, carry, masked):
    m, l, acc = carry
    cols = st.rows(kj, st.bk)
    k, v = k_ref[cols, :], v_ref[cols, :]
    s, ok, _ = st.scores(q, k, None if bias_ref is None else bias_ref[:, cols], qi, kj,
                         kv_valid, masked, score_refs, mask_refs)
    if ok is not None:
      s = jnp.where(ok, s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = _hide(jnp.exp(s - m_new), ok)
    correction = jnp.exp(m - m_new)
    l = correction * l + p.sum(axis=1, keepdims=True)      # the normaliser sees every weight
    p = st.drop(p, dropout, qi * st.bq, kj * st.bk)
    acc = correction * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((st.bq, 1), _MASKED, jnp.float32), jnp.zeros((st.bq, 1), jnp.float32),
          jnp.zeros((st.bq, dv), jnp.float32))
  m, l, acc = st.visit("keys", qi, table_refs, body, init, kv_valid)
  has_key = l > 0.0
  safe_l = jnp.where(has_key, l, 1.0)
  o_ref[...] = jnp.where(has_key, acc / safe_l, 0.0).astype(o_ref.dtype)
  st.store_rows(lse_ref, jnp.where(has_key, m + jnp.log(safe_l), _MASKED))


def _dkdv_kernel(*refs, st: _Setting):
  len_ref, seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
  bias_ref = rest.pop(0) if st.bias_shape else None
  score_refs, mask_refs = _take(rest, st.n_score), _take(rest, st.n_mask)
  table_refs = _take(rest, 6 if st.block_table else 0)
  dk_ref, dv_ref = _take(rest, 2)
  dbias_ref = rest.pop(0) if st.bias_grad else None
  grads = st.grads_in("dkdv")
  dmod_refs = rest                                  # one per index in grads
  if dbias_ref is not None:
    dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)   # rows no query block visits
  kj = pl.program_id(2)
  kv_valid = st.kv_valid(len_ref)
  dropout = st.dropout_state(seed_ref)
  k, v = k_ref[...], v_ref[...]

  def body(qi, carry, masked):
    dk, dv, *dmods = carry
    rows = st.rows(qi, st.bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    lse, delta = lse_ref[rows, :][:, :1], delta_ref[rows, :][:, :1]
    s, ok, back = st.scores(q, k, None if bias_ref is None else bias_ref[rows, :], qi, kj,
                            kv_valid, masked, score_refs, mask_refs, with_vjp=True)
    p = _hide(jnp.exp(s - lse), ok)                                     # [bq, bk]
    dv = dv + _tq(st.drop(p, dropout, qi * st.bq, kj * st.bk).astype(do.dtype), do)
    # delta = rowsum(dO * O) with O the dropped output: FlashAttention's
    # dropout backward, dS = P * (drop(dP) - delta).
    ds = p * (st.drop(_qk(do, v), dropout, qi * st.bq, kj * st.bk) - delta)
    if back is not None:       # through the score_mod, to the raw score and its values
      ds, d_values = back(ds)
      dmods = [acc + d_values[st.score_split.grads.index(i)] for acc, i in zip(dmods, grads)]
    dk = dk + _tq(ds.astype(q.dtype), q) * st.scale
    if dbias_ref is not None:
      dbias_ref[rows, :] = ds.astype(dbias_ref.dtype)      # d bias = d scores
    return (dk, dv, *dmods)

  init = [jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)]
  init += [jnp.zeros(st.score_split.values[i].shape, jnp.float32) for i in grads]
  dk, dv, *dmods = st.visit("queries", kj, table_refs, body, tuple(init), kv_valid)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  for ref, d in zip(dmod_refs, dmods):
    ref[...] = d


def _dq_kernel(*refs, st: _Setting):
  len_ref, seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
  bias_ref = rest.pop(0) if st.bias_shape else None
  score_refs, mask_refs = _take(rest, st.n_score), _take(rest, st.n_mask)
  table_refs = _take(rest, 6 if st.block_table else 0)
  dq_ref, *dmod_refs = rest
  grads = st.grads_in("dq")
  # Values of the relative position get one cotangent tile per visited key
  # block ([nk, bq, bk] per program, summed per offset outside: no two key
  # blocks of one query block share an offset); the others a running sum.
  tiled = {i: ref for i, ref in zip(grads, dmod_refs) if st.score_split.values[i].per_offset}
  summed = [i for i in grads if i not in tiled]
  summed_refs = [ref for i, ref in zip(grads, dmod_refs) if i not in tiled]
  for ref in tiled.values():       # blocks this program never visits
    def zero(j, carry, ref=ref):
      ref[j] = jnp.zeros(ref.shape[1:], ref.dtype)
      return carry
    lax.fori_loop(0, st.nk, zero, 0)
  qi = pl.program_id(2)
  kv_valid = st.kv_valid(len_ref)
  dropout = st.dropout_state(seed_ref)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, :1], delta_ref[...][:, :1]

  def body(kj, carry, masked):
    dq, *dmods = carry
    cols = st.rows(kj, st.bk)
    k, v = k_ref[cols, :], v_ref[cols, :]
    s, ok, back = st.scores(q, k, None if bias_ref is None else bias_ref[:, cols], qi, kj,
                            kv_valid, masked, score_refs, mask_refs, with_vjp=True)
    p = _hide(jnp.exp(s - lse), ok)
    ds = p * (st.drop(_qk(do, v), dropout, qi * st.bq, kj * st.bk) - delta)
    if back is not None:
      ds, d_values = back(ds)
      d_of = lambda i: d_values[st.score_split.grads.index(i)]
      dmods = [acc + d_of(i) for acc, i in zip(dmods, summed)]
      for i, ref in tiled.items():
        ref[kj] = d_of(i)
    dq = dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * st.scale
    return (dq, *dmods)

  init = [jnp.zeros(q.shape, jnp.float32)]
  init += [jnp.zeros(st.score_split.values[i].shape, jnp.float32) for i in summed]
  dq, *dmods = st.visit("keys", qi, table_refs, body, tuple(init), kv_valid)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  for ref, d in zip(summed_refs, dmods):
    ref[...] = d


def _specs(st: _Setting, d: int, dv: int):
  """BlockSpecs over heads-major ``[b, n, length, dim]`` arrays, grid (b, n, block)."""
  if st.tpu:
    length = pl.BlockSpec(memory_space=pltpu.SMEM)
    seed = pl.BlockSpec(memory_space=pltpu.SMEM)
  else:
    length = pl.BlockSpec((1,), lambda b, n, i: (b,))
    seed = pl.BlockSpec((2,), lambda b, n, i: (0,))
  q_block = pl.BlockSpec((None, None, st.bq, d), lambda b, n, i: (b, n, i, 0))
  q_full = pl.BlockSpec((None, None, st.q_padded, d), lambda b, n, i: (b, n, 0, 0))
  k_block = pl.BlockSpec((None, None, st.bk, d), lambda b, n, i: (b, n, i, 0))
  k_full = pl.BlockSpec((None, None, st.kv_padded, d), lambda b, n, i: (b, n, 0, 0))
  v_block = pl.BlockSpec((None, None, st.bk, dv), lambda b, n, i: (b, n, i, 0))
  v_full = pl.BlockSpec((None, None, st.kv_padded, dv), lambda b, n, i: (b, n, 0, 0))
  o_block = pl.BlockSpec((None, None, st.bq, dv), lambda b, n, i: (b, n, i, 0))
  o_full = pl.BlockSpec((None, None, st.q_padded, dv), lambda b, n, i: (b, n, 0, 0))
  row_block = pl.BlockSpec((None, None, st.bq, st.lanes), lambda b, n, i: (b, n, i, 0))
  row_full = pl.BlockSpec((None, None, st.q_padded, st.lanes), lambda b, n, i: (b, n, 0, 0))
  if st.bias_shape:
    # A bias shared over the batch or the heads is read at index 0 there.
    pick = lambda b, n: (b if st.bias_shape[0] > 1 else 0, n if st.bias_shape[1] > 1 else 0)
    bias_rows = pl.BlockSpec((None, None, st.bq, st.kv_padded),
                             lambda b, n, i: pick(b, n) + (i, 0))
    bias_cols = pl.BlockSpec((None, None, st.q_padded, st.bk),
                             lambda b, n, i: pick(b, n) + (0, i))
    dbias_cols = pl.BlockSpec((None, None, st.q_padded, st.bk), lambda b, n, i: (b, n, 0, i))
  return locals()


def _call_options(target: str):
  """``pallas_call`` keywords that pick the compiler for ``target``."""
  if target == "triton":
    return dict(compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))
  if target == "tpu":
    return dict(compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel")))
  if target == "tpu_interpret":
    return dict(interpret=pltpu.InterpretParams())
  return dict(interpret=True)


def _make(st: _Setting, target: str, with_lse: bool = False):
  """custom_vjp attention over padded heads-major arrays and kv lengths ``[b]``;
  with ``with_lse`` it also returns the per-row statistics ``[b, n, Tp, lanes]``
  (the log-sum-exp, broadcast over lanes)."""
  options = _call_options(target)
  backward_setting = st.for_backward      # bwd's own ``st``: what is differentiated

  def rows_shape(b, n):
    return jax.ShapeDtypeStruct((b, n, st.q_padded, st.lanes), jnp.float32)

  biased = lambda bias: [] if bias is None else [bias]

  def value_specs(split, values):
    """Each value ``[b | 1, n | 1, nq | 1, nk | 1, a, c]``: a program reads
    its sequence's and head's ``[nq | 1, nk | 1, a, c]``."""
    if split is None:
      return []
    return [pl.BlockSpec((None, None) + x.shape[2:],
                         lambda b, n, i, v=v: (b if v.per_batch else 0,
                                               n if v.per_head else 0, 0, 0, 0, 0))
            for v, x in zip(split.values, values)]

  def mod_specs(score_values, mask_values, tables):
    if st.tpu:
      table_specs = [pl.BlockSpec(memory_space=pltpu.SMEM) for _ in tables]
    else:
      table_specs = [pl.BlockSpec(t.shape, lambda b, n, i, nd=t.ndim: (0,) * nd) for t in tables]
    return (value_specs(st.score_split, score_values)
            + value_specs(st.mask_split, mask_values) + table_specs)

  def forward(q, k, v, lengths, seed, bias, score_values, mask_values, tables):
    b, n, _, d = q.shape
    dv = v.shape[-1]
    sp = _specs(st, d, dv)
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        grid=(b, n, st.nq),
        in_specs=[sp["length"], sp["seed"], sp["q_block"], sp["k_full"], sp["v_full"]]
        + ([sp["bias_rows"]] if st.bias_shape else [])
        + mod_specs(score_values, mask_values, tables),
        out_specs=[sp["o_block"], sp["row_block"]],
        out_shape=[jax.ShapeDtypeStruct((b, n, st.q_padded, dv), q.dtype), rows_shape(b, n)],
        name="attention_lab_flash_forward", **options,
    )(lengths, seed, q, k, v, *biased(bias), *score_values, *mask_values, *tables)

  @jax.custom_vjp
  def attend(q, k, v, lengths, seed, bias, score_values, mask_values, tables):
    out, lse = forward(q, k, v, lengths, seed, bias, score_values, mask_values, tables)
    return (out, lse) if with_lse else out

  def fwd(*primals):
    # symbolic_zeros: each array comes as CustomVJPPrimal(value, perturbed),
    # so the backward learns which of the bias and the score_mod values are
    # differentiated (told by the residuals' structure: () wanted, None not).
    args = jax.tree.map(lambda p: p.value, primals,
                        is_leaf=lambda x: isinstance(x, CustomVJPPrimal))
    q, k, v, lengths, seed, bias, score_values, mask_values, tables = args
    wanted = lambda p: () if p is not None and p.perturbed else None
    wants = (wanted(primals[5]), tuple(wanted(p) for p in primals[6]))
    out, lse = forward(*args)
    return ((out, lse) if with_lse else out), (q, k, v, lengths, seed, bias, score_values,
                                               mask_values, tables, out, lse, wants)

  def d_value_outputs(st, kernel, b, n, count):
    """Per-program partial cotangents of the score_mod values ``kernel`` sums
    (``st``: the backward's setting):
    ``[b, n, count, a, c]`` float32 each (``count`` its programs' blocks);
    a value of the relative position ``[b, n, nq, nk, bq, bk]``, one tile
    per block pair."""
    shapes, specs = [], []
    for i in st.grads_in(kernel):
      a, c = st.score_split.values[i].shape
      if st.score_split.values[i].per_offset:
        shapes.append(jax.ShapeDtypeStruct((b, n, count, st.nk, a, c), jnp.float32))
        specs.append(pl.BlockSpec((None, None, None, st.nk, a, c),
                                  lambda b, n, i: (b, n, i, 0, 0, 0)))
        continue
      shapes.append(jax.ShapeDtypeStruct((b, n, count, a, c), jnp.float32))
      specs.append(pl.BlockSpec((None, None, None, a, c), lambda b, n, i: (b, n, i, 0, 0)))
    return shapes, specs

  def bwd(res, cotangent):
    q, k, v, lengths, seed, bias, score_values, mask_values, tables, out, lse, wants = res
    d_out, d_lse = cotangent if with_lse else (cotangent, None)
    if isinstance(d_out, SymbolicZero):          # only the statistics are used
      d_out = jnp.zeros(d_out.shape, d_out.dtype)
    if isinstance(d_lse, SymbolicZero):
      d_lse = None
    st = backward_setting(wants[0] is not None,
                          {i for i, w in enumerate(wants[1]) if w is not None})
    b, n, _, d = q.shape
    dv = v.shape[-1]
    sp = _specs(st, d, dv)
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    if d_lse is not None:
      # d lse_i / d s_ij = p_ij: the log-sum-exp's cotangent lowers delta.
      # The statistic is stored broadcast over lanes; the caller read lane 0.
      delta = delta - jnp.sum(d_lse, axis=-1, keepdims=True)
    delta = jnp.broadcast_to(delta, lse.shape)
    mods_in = mod_specs(score_values, mask_values, tables)
    d_shapes, d_specs = d_value_outputs(st, "dkdv", b, n, st.nk)
    grads = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=(b, n, st.nk),
        in_specs=[sp["length"], sp["seed"], sp["q_full"], sp["k_block"], sp["v_block"],
                  sp["o_full"], sp["row_full"], sp["row_full"]]
        + ([sp["bias_cols"]] if st.bias_shape else []) + mods_in,
        out_specs=[sp["k_block"], sp["v_block"]]
        + ([sp["dbias_cols"]] if st.bias_grad else []) + d_specs,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        + ([jax.ShapeDtypeStruct((b, n, st.q_padded, st.kv_padded), jnp.float32)]
           if st.bias_grad else []) + d_shapes,
        name="attention_lab_flash_dkdv", **options,
    )(lengths, seed, q, k, v, d_out, lse, delta, *biased(bias), *score_values, *mask_values,
      *tables)
    d_k, d_v, *rest = grads
    d_bias = None
    if st.bias_grad:
      # Per (sequence, head) score gradients, summed where the bias is shared.
      d_scores = rest.pop(0)
      axes = tuple(i for i in (0, 1) if bias.shape[i] == 1 and d_scores.shape[i] != 1)
      d_bias = d_scores.sum(axis=axes, keepdims=True).astype(bias.dtype)
    d_per_key = rest
    d_shapes, d_specs = d_value_outputs(st, "dq", b, n, st.nq)
    d_q, *d_per_query = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(b, n, st.nq),
        in_specs=[sp["length"], sp["seed"], sp["q_block"], sp["k_full"], sp["v_full"],
                  sp["o_block"], sp["row_block"], sp["row_block"]]
        + ([sp["bias_rows"]] if st.bias_shape else []) + mods_in,
        out_specs=[sp["q_block"]] + d_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + d_shapes,
        name="attention_lab_flash_dq", **options,
    )(lengths, seed, q, k, v, d_out, lse, delta, *biased(bias), *score_values, *mask_values,
      *tables)
    d_score_values = [None] * len(score_values)
    for kernel, partials in (("dkdv", d_per_key), ("dq", d_per_query)):
      for i, g in zip(st.grads_in(kernel), partials):
        if st.score_split.values[i].per_offset:
          g = _sum_to_offsets(g, st)
        d_score_values[i] = _sum_to(g, score_values[i], kernel)
    return (d_q, d_k, d_v, None, None, d_bias, tuple(d_score_values),
            tuple(None for _ in mask_values), tuple(None for _ in tables))

  attend.defvjp(fwd, bwd, symbolic_zeros=True)
  return attend


def _sum_to(partial, value, kernel):
  """Per-program partial cotangents ``[b, n, blocks, a, c]`` (``kernel``'s
  blocks: key blocks for "dkdv", query blocks for "dq") summed into the
  value's own shape ``[b | 1, n | 1, nq | 1, nk | 1, a, c]``."""
  g = jnp.expand_dims(partial, 2 if kernel == "dkdv" else 3)
  axes = tuple(i for i in range(4) if value.shape[i] == 1 and g.shape[i] != 1)
  return g.sum(axis=axes, keepdims=True).astype(value.dtype)


def _sum_to_offsets(partial, st: _Setting):
  """Cotangent tiles per block pair ``[b, n, nq, nk, bq, bk]`` summed onto
  their offset's tile: ``[b, n, offsets, bq, bk]`` (``_sum_to`` then gives
  the value's ``[b | 1, n | 1, offsets, 1, bq, bk]``)."""
  b, n = partial.shape[:2]
  qi, kj = np.meshgrid(np.arange(st.nq), np.arange(st.nk), indexing="ij")
  tile = fused_mods.offset_index(qi, kj, st.nq, st.bq, st.bk).reshape(-1)
  count = fused_mods.offset_layout(st.nq, st.nk, st.bq, st.bk)[0]
  flat = jnp.moveaxis(partial.reshape((b, n, st.nq * st.nk) + partial.shape[4:]), 2, 0)
  summed = jax.ops.segment_sum(flat, jnp.asarray(tile), num_segments=count)
  return jnp.moveaxis(summed, 0, 2)                  # [b, n, offsets, bq, bk]


def _block_tables(table, st: _Setting):
  """A ``masks.BlockMask`` as the kernels read it: int32 ``kv_blocks [nq, nk]``,
  ``kv_count [nq]``, ``kv_full [nq]``, ``q_blocks [nk, nq]``, ``q_count
  [nk]``, ``q_full [nk]`` (which key blocks each query block visits, full
  ones first, and the reverse for dK/dV), padded to powers of two for
  Triton's loads."""
  def padded(x):
    x = np.asarray(x, np.int32)
    size = [pl.next_power_of_2(d) for d in x.shape]
    return jnp.asarray(np.pad(x, [(0, s - d) for s, d in zip(size, x.shape)]))
  return tuple(padded(x) for x in (table.kv_blocks, table.kv_count, table.kv_full,
                                   table.q_blocks, table.q_count, table.q_full))


def _bias_4d(bias, shape, q_padded, kv_padded):
  """A bias broadcastable to ``[batch..., heads, q, kv]`` as float32
  ``[1 or flat batch, 1 or heads, q_padded, kv_padded]`` (zero padding; padded
  keys are masked anyway)."""
  bias = checks.collapse_batch(bias, shape.batch)
  bias = jnp.broadcast_to(bias, bias.shape[:2] + (shape.q_length, shape.kv_length))
  pads = [(0, 0), (0, 0), (0, q_padded - shape.q_length), (0, kv_padded - shape.kv_length)]
  return jnp.pad(bias.astype(jnp.float32), pads)


def _tpu_tiles(shape: checks.AttentionShape, block_q: int, block_k: int):
  """``(block_q, block_k, head_dim, value_dim)`` as the TPU kernels use them:
  blocks multiples of the 128-wide tile, no longer than the padded sequence;
  head dims padded to 128 lanes."""
  return (min(_round_up(block_q, TPU_BLOCK), _round_up(shape.q_length, TPU_BLOCK)),
          min(_round_up(block_k, TPU_BLOCK), _round_up(shape.kv_length, TPU_BLOCK)),
          _round_up(shape.head_dim, TPU_LANES), _round_up(shape.value_dim, TPU_LANES))


def _attend_on(target, query, key, value, lengths, seed, bias, *, shape, scale, is_causal,
               window, block_q, block_k, return_residual=False, keep_prob=None,
               broadcast_dropout=True, score_mod=None, mask_mod=None, has_lengths=True):
  """The whole call for one target: tiles, padding, kernel, unpadding."""
  tpu = target in ("tpu", "tpu_interpret")
  batch = shape.batch
  if tpu:
    block_q, block_k, d_pad, dv_pad = _tpu_tiles(shape, block_q, block_k)
  else:
    # Tiles no longer than the (power-of-two rounded) sequence, at least 16;
    # head dims padded to a power of two >= 16 (what GPU tiles want).
    block_q = max(16, min(block_q, pl.next_power_of_2(shape.q_length)))
    block_k = max(16, min(block_k, pl.next_power_of_2(shape.kv_length)))
    d_pad = max(16, pl.next_power_of_2(shape.head_dim))
    dv_pad = max(16, pl.next_power_of_2(shape.value_dim))
  score_split = mask_split = None
  try:
    if score_mod is not None:
      score_split = fused_mods.split(score_mod, "score_mod", block_q, block_k,
                                     shape.q_length, shape.kv_length)
    if mask_mod is not None:
      mask_split = fused_mods.split(mask_mod, "mask_mod", block_q, block_k,
                                    shape.q_length, shape.kv_length)
  except fused_mods.Refused as e:
    raise ValueError(f"pallas_attention: {e}; blockwise takes any score_mod / mask_mod") from None
  st = _Setting(shape.q_length, shape.kv_length, block_q, block_k, scale, is_causal,
                window, tpu, keep_prob, broadcast_dropout, shape.heads,
                score_split=score_split, mask_split=mask_split, has_lengths=has_lengths)
  # The mods' outside parts, for every sequence, head and block (plain JAX,
  # so gradients reach the arrays they read through autodiff).
  flat = math.prod(batch) if batch else 1
  outside = lambda split: (() if split is None else
                           tuple(split.outside(flat, shape.heads, st.nq, st.nk)))
  score_values, mask_values = outside(score_split), outside(mask_split)
  tables = ()
  if mask_mod is not None:
    try:
      table = masks.block_mask(mask_mod, flat, shape.heads, shape.q_length, shape.kv_length,
                               block_q, block_k, is_causal=is_causal, window=window)
    except ValueError:
      # Per device under a data mesh the mod reads the shard_map's row
      # offset (dispatch._shift_batch), which host evaluation cannot mix
      # with its own arrays: no static block mask; the band is visited.
      table = None
    if table is not None:        # a static mask_mod: its empty blocks are skipped
      st.block_table = True
      tables = _block_tables(table, st)
  if bias is not None:
    bias = _bias_4d(bias, shape, st.q_padded, st.kv_padded)
    st.bias_shape = bias.shape[:2]

  # Zero columns change neither the scores (the scale is fixed from the true
  # head_dim) nor the output (sliced off).
  q = heads_major(query, len(batch), st.q_padded, d_pad)
  k = heads_major(repeat_kv_heads(key, shape.heads), len(batch), st.kv_padded, d_pad)
  v = heads_major(repeat_kv_heads(value, shape.heads), len(batch), st.kv_padded, dv_pad)
  out = _make(st, target, return_residual)(q, k, v, lengths, seed, bias, score_values,
                                           mask_values, tables)
  out, rows = out if return_residual else (out, None)
  out = jnp.swapaxes(out[:, :, :shape.q_length, :shape.value_dim], 1, 2)
  out = out.reshape(batch + out.shape[1:])
  if rows is None:
    return out
  lse = rows[:, :, :shape.q_length, 0]
  lse = jnp.where(lse <= _MASKED, -jnp.inf, lse)          # no key: the log of an empty sum
  lse = jnp.swapaxes(lse, 1, 2)                          # [b, t, n]
  return out, lse.reshape(batch + lse.shape[1:])


def tpu_vmem_bytes(shape: checks.AttentionShape, dtype, bias: bool,
                   block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                   score_mod=None) -> int:
  """Bytes of VMEM the largest of the three kernels' blocks take on a TPU
  (every block double-buffered, as Mosaic's pipeline holds them), for the
  blocks and padding ``_attend_on`` uses there. A ``score_mod``'s values
  count as stored: every block's for a sequence and head (one tile per block
  offset for a value of the relative position), and the dQ kernel's
  cotangent tiles of a learned one."""
  item = jnp.dtype(dtype).itemsize
  bq, bk, d, dv = _tpu_tiles(shape, block_q, block_k)
  qp, kp = _round_up(shape.q_length, bq), _round_up(shape.kv_length, bk)
  nq, nk = qp // bq, kp // bk
  row = TPU_LANES * 4                                 # a float32 statistic per row
  values = tiles = 0
  if score_mod is not None:
    try:
      split = fused_mods.split(score_mod, "score_mod", bq, bk, shape.q_length, shape.kv_length)
    except fused_mods.Refused:
      split = None                                    # pallas_refusal says why
    for v in [] if split is None else split.values:
      a, c = v.shape
      blocks = (fused_mods.offset_layout(nq, nk, bq, bk)[0] if v.per_offset else
                (nq if v.per_q else 1) * (nk if v.per_k else 1))
      values += blocks * a * c * jnp.dtype(v.stored_dtype).itemsize
      tiles += nk * a * c * 4 if v.per_offset and v.grad else 0
  forward = ((bq * d + kp * d + kp * dv + bq * dv) * item + bq * row + bias * bq * kp * 4
             + values)
  dq = ((2 * bq * d + kp * d + kp * dv + bq * dv) * item + 2 * bq * row + bias * bq * kp * 4
        + values + tiles)
  dkdv = ((qp * d + qp * dv + 2 * bk * d + 2 * bk * dv) * item + 2 * qp * row
          + 2 * bias * qp * bk * 4 + values)
  return 2 * max(forward, dq, dkdv)


def pallas_limit(platform: str, shape: checks.AttentionShape, dtype, features, *,
                 window=None, options=None, score_mod=None) -> Optional[str]:
  """Why automatic dispatch should not run this call on ``platform``'s
  Pallas kernel: on a TPU, blocks over ``TPU_VMEM_BUDGET`` (Mosaic would
  fail to compile them). None elsewhere, and when they fit."""
  del window
  if platform != "tpu" or dtype is None:
    return None
  options = options or {}
  need = tpu_vmem_bytes(shape, dtype, "bias" in features,
                        options.get("block_q", DEFAULT_BLOCK_Q),
                        options.get("block_k", DEFAULT_BLOCK_K), score_mod)
  if need <= TPU_VMEM_BUDGET:
    return None
  return (f"its whole-sequence blocks would take {need / 2 ** 20:.0f} MiB of VMEM at "
          f"{max(shape.q_length, shape.kv_length)} tokens, over the "
          f"{TPU_VMEM_BUDGET // 2 ** 20} MiB a TPU core gives them")


def pallas_refusal(shape: checks.AttentionShape, mask_mod, score_mod=None) -> Optional[str]:
  """Why the Pallas kernel cannot take these mods (None: it can): an
  operation per (query, key) pair that Triton and Mosaic do not lower (a
  gather indexed by both positions otherwise than through ``kv_idx -
  q_idx``), or a value of a shape no block holds
  (``fused_mods.split``). What a mod may compute does not depend on the
  block size, so the GPU's default blocks stand for every target."""
  block_q = max(16, min(DEFAULT_BLOCK_Q, pl.next_power_of_2(shape.q_length)))
  block_k = max(16, min(DEFAULT_BLOCK_K, pl.next_power_of_2(shape.kv_length)))
  mesh = jax.sharding.get_abstract_mesh()
  # Dispatch runs a per_device kernel in a shard_map over a "data" axis.
  per_device = not mesh.empty and mesh.shape.get("data", 1) > 1
  for fn, kind in ((score_mod, "score_mod"), (mask_mod, "mask_mod")):
    reason = fused_mods.refusal(fn, kind, block_q, block_k, shape.q_length, shape.kv_length,
                                per_device)
    if reason:
      return reason
  return None


def pallas_attention(query, key, value, bias=None, mask=None, *,
                     scale: Optional[float] = None, is_causal: bool = False,
                     local_window_size=None, kv_lengths=None, return_residual: bool = False,
                     dropout_rate: float = 0.0, dropout_rng=None,
                     broadcast_dropout: bool = True, score_mod=None, mask_mod=None,
                     block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                     target: Optional[str] = None, interpret: Optional[bool] = None):
  """Flash attention in Pallas; arguments and shapes as ``reference_attention``.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``.
    value: ``[batch..., kv_length, kv_heads, value_dim]``.
    bias: float, broadcastable to ``[batch..., heads, q_length, kv_length]``
      (``-inf`` hides a key); read block by block, with its gradient.
    mask: not supported (ValueError); use ``kv_lengths`` for padding.
    kv_lengths: int ``[batch...]``, number of valid keys per sequence.
    return_residual: also return the float32 log-sum-exp ``[batch..., q_length,
      heads]`` (``-inf`` where a query has no key), differentiable.
    dropout_rate / dropout_rng / broadcast_dropout: dropout on the weights
      (Flax's meaning: kept weights scaled by ``1 / (1 - rate)``; with
      ``broadcast_dropout`` one mask for every sequence and head). The mask
      is ``dropout_keep`` of seeds drawn from ``dropout_rng``, regenerated
      per block in the backward kernels (never stored).
    score_mod / mask_mod: FlexAttention-style hooks (``kernels.mods``), run
      per block inside the three kernels; what they compute per sequence,
      head, query row or key column runs before the kernel
      (``fused_mods``), and gradients reach the arrays a score_mod closes
      over. What depends on the two positions only through ``kv_idx -
      q_idx`` (a relative-position table, T5 buckets) runs before the
      kernel once per block offset (``[.., offsets, 1, bq, bk]``, linear in
      the length); its gradient comes from one cotangent tile per block
      pair (``[batch, heads, q_padded, kv_padded]`` float32 in the backward
      only, as a dense bias's gradient), summed per offset outside. Any
      other gather per (query, key) pair is a ValueError (``pallas_refusal``).
    block_q / block_k: tile sizes (powers of two; at least 16 on GPU, rounded
      up to multiples of 128 on TPU).
    target: one of ``TARGETS``; None picks per lowering platform (Triton on
      GPU, Mosaic on TPU, the interpreter on CPU).
    interpret: True is ``target="interpret"`` (kept for older callers).

  Returns:
    ``[batch..., q_length, heads, value_dim]`` in the query dtype (and the
    residual).
  """
  checks.refuse_dense("pallas", None, mask)
  shape = checks.check_inputs(query, key, value, bias=bias, who="pallas_attention")
  if interpret:
    target = "interpret"
  if target is not None and target not in TARGETS:
    raise ValueError(f"pallas_attention: unknown target {target!r}; targets: {', '.join(TARGETS)}")
  for name, size in (("block_q", block_q), ("block_k", block_k)):
    if size <= 0 or size & (size - 1):
      raise ValueError(f"pallas_attention: {name} must be a power of two, got {size}")
  window = None if local_window_size is None else _window_sides(local_window_size)
  lengths = checks.kv_lengths_vector("pallas_attention", kv_lengths, shape)
  keep_prob = None
  seed = jnp.zeros((2,), jnp.int32)
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("pallas_attention: dropout_rate > 0 needs dropout_rng")
    if dropout_rate >= 1.0:
      raise ValueError(f"pallas_attention: dropout_rate must be below 1, got {dropout_rate}")
    keep_prob, seed = 1.0 - float(dropout_rate), dropout_seed(dropout_rng)

  run = functools.partial(
      _attend_on, shape=shape, scale=shape.head_dim ** -0.5 if scale is None else scale,
      is_causal=is_causal, window=window, block_q=block_q, block_k=block_k,
      return_residual=return_residual, keep_prob=keep_prob,
      broadcast_dropout=broadcast_dropout, score_mod=score_mod, mask_mod=mask_mod,
      has_lengths=kv_lengths is not None)
  if target is not None:
    return run(target, query, key, value, lengths, seed, bias)
  return lax.platform_dependent(
      query, key, value, lengths, seed, bias,
      cpu=functools.partial(run, "interpret"),
      cuda=functools.partial(run, "triton"), rocm=functools.partial(run, "triton"),
      tpu=functools.partial(run, "tpu"))
