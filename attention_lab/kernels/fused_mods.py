"""score_mod / mask_mod inside a fused kernel: each mod split at the block.

A fused kernel runs one program per ``(sequence, head, block)`` and can lower
only what its compiler takes per block: elementwise arithmetic, comparisons,
``where``, ``tanh``... Gathers (``slopes[head]``, ``doc_ids[batch, q_idx]``)
Triton and Mosaic cannot lower. But most of a mod's gathers read only the
batch and head indices, or one of the two positions, not both: ALiBi's
``slopes[head]`` is one number per program, a document mask's
``ids[batch, q_idx]`` one per query row. So a mod is traced once at block
shape and its operations are sorted by what they depend on
(``split``):

* **inside** -- anything that reads the score, or both the query and the key
  position: evaluated in the kernel, per block, on the block's index grid;
* **outside** -- everything else (per program, per query row or per key
  column): evaluated before the kernel in plain JAX, for every sequence, head
  and block at once (``Split.outside``), and handed to the kernel as inputs
  (``[batch | 1, heads | 1, query blocks | 1, key blocks | 1, a, c]`` with
  ``a x c`` one of ``1 x 1``, ``block_q x 1``, ``1 x block_k``, ``block_q x
  block_k``);
* **outside per block offset** -- what depends on the two positions only
  through the relative position ``kv_idx - q_idx`` (a relative-position
  table's ``table[head, clip(j - i, -D, D) + D]``, T5's buckets) but needs an
  operation the kernel cannot lower. Such a value is the same
  ``[block_q, block_k]`` tile for every block pair with the same offset
  ``k_start - q_start``, so it is evaluated once per distinct offset
  (``Split.offsets``: ``nq + nk - 1`` of them for equal blocks) and handed to
  the kernel as ``[batch | 1, heads | 1, offsets, 1, block_q, block_k]``:
  linear in the length, never a ``[T, T]`` table. The analysis recognises
  the relative position as a ``sub`` of the key and the query position (as
  given, or broadcast, reshaped or cast): its result starts a dependency
  class of its own, and what mixes it with either position alone counts as
  reading both.

The arrays a ``score_mod`` closes over reach the kernel through those inputs,
so their gradients come from autodiff of the outside part once the kernel's
backward returns the cotangents of the inputs (``Split.inside``'s ``vjp``,
summed per program inside the kernel and over programs outside).

A mod whose inside part needs an operation outside ``INSIDE_PRIMITIVES`` (a
gather indexed by both positions otherwise than through ``j - i``, as a
dense ``table[i, j]``) is refused with the reason (``refusal``), and
dispatch moves on to ``blockwise``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

# What a kernel body lowers on Triton and Mosaic alike: elementwise
# arithmetic, comparisons and selects, casts, broadcasts and reshapes of
# block-shaped values. ``jit`` / ``custom_jvp_call`` (jnp.where, jnp.clip,
# jax.nn functions) are checked inside.
INSIDE_PRIMITIVES = frozenset({
    "add", "sub", "mul", "div", "rem", "neg", "max", "min", "abs", "sign", "exp", "exp2",
    "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt", "pow", "integer_pow",
    "square", "floor", "ceil", "round", "sin", "cos", "erf", "and", "or", "not", "xor",
    "eq", "ne", "lt", "le", "gt", "ge", "select_n", "convert_element_type",
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "clamp", "iota",
    "shift_left", "shift_right_logical", "shift_right_arithmetic", "copy", "copy_p",
    "stop_gradient", "jit", "pjit", "custom_jvp_call",
})
# What a value depends on: the score, the four indices, a learned array (a
# traced float the mod closes over) and any traced array.
# ``_REL``: the relative position ``kv_idx - q_idx`` (and what is computed
# from it alone).
_SCORE, _BATCH, _HEAD, _Q, _K, _PARAM, _TRACED = "s", "b", "h", "q", "k", "p", "t"
_REL = "r"
# Operations that keep a value equal to a position (for spotting ``k - q``).
_SAME_VALUE = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims",
                         "convert_element_type", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class Value:
  """One outside value the kernel reads: what it varies with and its block
  shape ``(a, c)`` (``a`` 1 or block_q, ``c`` 1 or block_k)."""
  var: object
  per_batch: bool
  per_head: bool
  per_q: bool
  per_k: bool
  shape: Tuple[int, int]
  dtype: object
  grad: bool            # float and reads a learned (traced float) array
  traced: bool = False  # reads a traced array (known only inside jit)
  # A function of kv_idx - q_idx: one [block_q, block_k] tile per block
  # offset (per_q and per_k are then False).
  per_offset: bool = False

  @property
  def stored_dtype(self):
    return jnp.int32 if self.dtype == jnp.bool_ else self.dtype


class Refused(ValueError):
  """The mod cannot run inside the kernel; the message says why."""


def _jaxprs_of(eqn):
  """The sub-jaxprs of a higher-order equation (jit, custom_jvp_call)."""
  for param in eqn.params.values():
    if isinstance(param, jex_core.ClosedJaxpr):
      yield param.jaxpr
    elif isinstance(param, jex_core.Jaxpr):
      yield param


def _outside_primitives(jaxpr) -> set:
  """Names of the primitives in ``jaxpr`` (sub-jaxprs included) that are
  not ``INSIDE_PRIMITIVES``."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name not in INSIDE_PRIMITIVES:
      found.add(eqn.primitive.name)
    for sub in _jaxprs_of(eqn):
      found |= _outside_primitives(sub)
  return found


def _check_inside(jaxpr, what: str) -> None:
  found = _outside_primitives(jaxpr)
  if found:
    raise Refused(f"its {what} computes {', '.join(sorted(found))} per (query, key) pair, "
                  f"which the Pallas kernel cannot lower (a gather indexed by both "
                  f"positions other than through kv_idx - q_idx, such as a table[q_idx, "
                  f"kv_idx])")


def _lowers_inside(eqn) -> bool:
  return eqn.primitive.name in INSIDE_PRIMITIVES and not any(
      _outside_primitives(sub) for sub in _jaxprs_of(eqn))


def offset_layout(nq: int, nk: int, block_q: int, block_k: int):
  """The distinct block offsets ``k_start - q_start`` of an ``nq x nk`` grid.

  With power-of-two blocks the offsets are the multiples of ``step =
  min(block_q, block_k)`` from ``-(nq - 1) block_q`` to ``(nk - 1) block_k``,
  every one of them taken by some block pair, so block pair ``(qi, kj)``
  reads tile ``(kj block_k - qi block_q + (nq - 1) block_q) / step``.

  Returns:
    ``(count, step, first)``: the number of tiles, the offset between
    neighbours and the first (most negative) offset.
  """
  step = math.gcd(block_q, block_k)
  first = -(nq - 1) * block_q
  return ((nk - 1) * block_k - first) // step + 1, step, first


def offset_index(qi, kj, nq: int, block_q: int, block_k: int):
  """The tile of block pair ``(qi, kj)`` (ints or traced int32 scalars)."""
  step = math.gcd(block_q, block_k)
  return (kj * block_k - qi * block_q + (nq - 1) * block_q) // step


@dataclasses.dataclass
class Split:
  """A mod split into its outside values and its inside operations.

  ``kind``: ``"score_mod"`` (args: score, batch, head, q_idx, kv_idx) or
  ``"mask_mod"`` (the four indices).
  """
  kind: str
  jaxpr: object
  consts: List
  block_q: int
  block_k: int
  values: List[Value]
  inside_eqns: List
  q_len: int
  kv_len: int

  @property
  def grads(self) -> List[int]:
    """Indices of the values that get cotangents."""
    return [i for i, v in enumerate(self.values) if v.grad]

  # -------------------------------------------------------------- outside

  def outside(self, batch: int, heads: int, nq: int, nk: int, consts=None) -> List:
    """Every value for every program and block, in plain JAX:
    ``[batch | 1, heads | 1, nq | 1, nk | 1, a, c]`` each (booleans as
    int32); a ``per_offset`` value ``[batch | 1, heads | 1, offsets, 1,
    block_q, block_k]`` (``offset_layout``)."""
    consts = self.consts if consts is None else consts
    out = [None] * len(self.values)
    groups = {}
    for i, v in enumerate(self.values):
      groups.setdefault((v.per_batch, v.per_head, v.per_q, v.per_k, v.per_offset),
                        []).append(i)
    count, step, first = offset_layout(nq, nk, self.block_q, self.block_k)
    for (pb, ph, pq, pk, po), which in groups.items():
      def one(b, h, qi, kj, which=which, po=po):
        if po:
          # qi is the offset's tile: any block pair with that offset gives
          # the same tile; positions are left unclamped (they differ from
          # the kernel's clamped ones only on padded rows and keys, which
          # are masked or sliced off).
          offset = first + qi * step
          q_start = jnp.maximum(-offset, 0)
          env = self._outside_env(b, h, q_start, q_start + offset, consts, which,
                                  clamp=False)
        else:
          env = self._outside_env(b, h, qi * self.block_q, kj * self.block_k, consts, which)
        return [jnp.asarray(env[self.values[i].var]).reshape(self.values[i].shape)
                .astype(self.values[i].stored_dtype) for i in which]
      fn = one
      for axis in range(4)[::-1]:      # vmap over k blocks, q blocks (offsets), heads, batch
        fn = jax.vmap(fn, in_axes=tuple(0 if a == axis else None for a in range(4)))
      sizes = ((batch, pb), (heads, ph), (count, True), (1, False)) if po else \
          ((batch, pb), (heads, ph), (nq, pq), (nk, pk))
      axes = [jnp.arange(n if on else 1, dtype=jnp.int32) for n, on in sizes]
      for i, arr in zip(which, fn(*axes)):
        out[i] = arr
    return out

  def _outside_env(self, b, h, q_start, k_start, consts, which, clamp=True):
    """Evaluates the outside equations that the values ``which`` need, for
    one program and the block starting at query ``q_start``, key ``k_start``."""
    q_pos = q_start + jnp.arange(self.block_q, dtype=jnp.int32)
    k_pos = k_start + jnp.arange(self.block_k, dtype=jnp.int32)
    if clamp:
      q_pos, k_pos = jnp.minimum(q_pos, self.q_len - 1), jnp.minimum(k_pos, self.kv_len - 1)
    index = [jnp.reshape(b, (1, 1, 1, 1)), jnp.reshape(h, (1, 1, 1, 1)),
             q_pos.reshape(1, 1, -1, 1), k_pos.reshape(1, 1, 1, -1)]
    env = dict(zip(self.jaxpr.constvars, consts))
    invars = self.jaxpr.invars[1:] if self.kind == "score_mod" else self.jaxpr.invars
    env.update(zip(invars, index))
    for eqn in _needed_eqns(self.jaxpr.eqns, [self.values[i].var for i in which]):
      if not all(isinstance(v, jex_core.Literal) or v in env for v in eqn.invars):
        continue           # reads what only the kernel makes (never needed here)
      _bind(eqn, env)
    return env

  # -------------------------------------------------------------- inside

  def inside(self, score, q_start, k_start, values: Sequence):
    """The mod on one ``[block_q, block_k]`` block, in a kernel body.

    Args:
      score: float32 ``[block_q, block_k]`` (score_mod), or None (mask_mod).
      q_start / k_start: the block's first query / key position.
      values: this program's block of each value, ``[a, c]`` each, in
        ``self.values``' order (as read from the kernel's inputs).

    Returns:
      ``[block_q, block_k]``: the modded score (float32), or the bool mask.
    """
    bq, bk = self.block_q, self.block_k
    q_pos = jnp.minimum(q_start + jax.lax.broadcasted_iota(jnp.int32, (1, 1, bq, 1), 2),
                        self.q_len - 1)
    k_pos = jnp.minimum(k_start + jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, bk), 3),
                        self.kv_len - 1)
    invars = self.jaxpr.invars
    env = {}
    if self.kind == "score_mod":
      env[invars[0]] = score.reshape(invars[0].aval.shape)
      invars = invars[1:]
    env[invars[2]], env[invars[3]] = q_pos, k_pos
    for v, x in zip(self.values, values):
      x = x != 0 if v.dtype == jnp.bool_ else x.astype(v.dtype)
      env[v.var] = x.reshape(v.var.aval.shape)
    for eqn in self.inside_eqns:
      _bind(eqn, env)
    (out,) = [_read(env, v) for v in self.jaxpr.outvars]
    out = jnp.broadcast_to(jnp.asarray(out).reshape((1,) * (4 - jnp.ndim(out))
                                                   + jnp.shape(out)), (1, 1, bq, bk))
    out = out.reshape(bq, bk)
    return out.astype(jnp.float32) if self.kind == "score_mod" else out

  def inside_vjp(self, score, q_start, k_start, values: Sequence):
    """``inside`` for a score_mod with its vjp: returns ``(modded, vjp)``,
    ``vjp(d_modded) -> (d_score, [d value for value in self.grads])``, each
    ``d value`` of the value's block shape ``[a, c]`` (float32)."""
    grads = self.grads

    def fn(score, *learned):
      vals = list(values)
      for i, x in zip(grads, learned):
        vals[i] = x
      return self.inside(score, q_start, k_start, vals)

    learned = [values[i].astype(jnp.float32) for i in grads]
    modded, vjp = jax.vjp(fn, score, *learned)

    def back(d_modded):
      d_score, *d_learned = vjp(d_modded)
      return d_score, list(d_learned)
    return modded, back


def _needed_eqns(eqns, targets) -> List:
  """The equations of ``eqns`` (in order) that ``targets`` depend on."""
  live = {v for v in targets if not isinstance(v, jex_core.Literal)}
  kept = []
  for eqn in reversed(eqns):
    if any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
  return kept[::-1]


def _read(env, v):
  return v.val if isinstance(v, jex_core.Literal) else env[v]


def _bind(eqn, env):
  """Evaluates one equation (``jax.core.eval_jaxpr``'s step)."""
  invals = [_read(env, v) for v in eqn.invars]
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  outs = out if eqn.primitive.multiple_results else [out]
  for var, val in zip(eqn.outvars, outs):
    env[var] = val


def split(fn: Callable, kind: str, block_q: int, block_k: int, q_len: int,
          kv_len: int) -> Split:
  """Traces ``fn`` (a score_mod or mask_mod) at one program's block shape
  and splits it; raises ``Refused`` when its inside part cannot be lowered."""
  index = [jax.ShapeDtypeStruct(s, jnp.int32)
           for s in ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1, block_q, 1), (1, 1, 1, block_k))]
  tags = [_BATCH, _HEAD, _Q, _K]
  args = index
  if kind == "score_mod":
    args = [jax.ShapeDtypeStruct((1, 1, block_q, block_k), jnp.float32)] + index
    tags = [_SCORE] + tags
  closed = jax.make_jaxpr(fn)(*args)
  jaxpr, consts = closed.jaxpr, list(closed.consts)
  deps = {}
  for var, tag in zip(jaxpr.invars, tags):
    deps[var] = frozenset({tag})
  for var, c in zip(jaxpr.constvars, consts):
    traced = isinstance(c, jax.core.Tracer)
    learned = traced and jnp.issubdtype(c.dtype, jnp.inexact)
    deps[var] = frozenset(({_PARAM} if learned else set()) | ({_TRACED} if traced else set()))
  of = lambda v: frozenset() if isinstance(v, jex_core.Literal) else deps[v]
  # Which variables equal the query or the key position (as given, or
  # broadcast, reshaped or cast): a sub of the two is the relative position.
  position = {jaxpr.invars[-2]: _Q, jaxpr.invars[-1]: _K}
  inside_eqns, inside_vars = [], set()
  for eqn in jaxpr.eqns:
    operands = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
    d = frozenset().union(*[of(v) for v in eqn.invars])
    name = eqn.primitive.name
    if name in _SAME_VALUE and len(operands) == 1 and operands[0] in position:
      position[eqn.outvars[0]] = position[operands[0]]
    elif (name == "sub" and len(operands) == 2
          and {position.get(v) for v in operands} == {_Q, _K}):
      d = frozenset({_REL})
    for var in eqn.outvars:
      deps[var] = d
    # Inside: what reads the score or both positions, and what the kernel
    # can compute from the relative position (j - i itself, ALiBi's
    # slope * (j - i)); a gather by the relative position runs outside once
    # per block offset.
    both = {_Q, _K} <= d or (_REL in d and (_Q in d or _K in d))
    relative = _REL in d and not both and all(
        _REL not in of(v) or v in inside_vars for v in operands) and _lowers_inside(eqn)
    if _SCORE in d or both or relative:
      inside_eqns.append(eqn)
      inside_vars.update(eqn.outvars)
  # Keep only the inside equations the output needs (a relative index
  # computed inside but read only by an outside gather is not).
  inside_eqns = _needed_eqns(inside_eqns, jaxpr.outvars)
  inside_vars = {v for eqn in inside_eqns for v in eqn.outvars}
  what = kind.replace("_", " ")
  sub = jex_core.Jaxpr(constvars=(), invars=(), outvars=(), eqns=inside_eqns)
  _check_inside(sub, what)

  # Outside values the inside reads (or the output itself, when the whole
  # mod is outside: a mask of rows, say). Positions and the score are made in
  # the kernel.
  made_inside = set(inside_vars)
  if kind == "score_mod":
    made_inside.add(jaxpr.invars[0])
  positions = jaxpr.invars[-2:]
  needed = []
  for eqn in inside_eqns:
    needed += [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
  needed += [v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)]
  values, seen = [], set()
  for var in needed:
    if var in made_inside or var in positions or var in seen:
      continue
    seen.add(var)
    shape = tuple(var.aval.shape)
    full = (1,) * (4 - len(shape)) + shape
    a, c = full[-2], full[-1]
    if len(full) > 4 or full[:2] != (1, 1) or a not in (1, block_q) or c not in (1, block_k):
      raise Refused(f"its {what} reads a value of shape {shape} inside the block "
                    f"(not a per-block [1, 1, Q|1, K|1] array)")
    d = deps[var]
    grad = _PARAM in d and jnp.issubdtype(var.aval.dtype, jnp.inexact)
    per_offset = _REL in d
    if per_offset and (a, c) != (block_q, block_k):
      raise Refused(f"its {what} reads a value of the relative position of shape {shape} "
                    f"inside the block (not a [1, 1, Q, K] block)")
    values.append(Value(var, _BATCH in d, _HEAD in d, _Q in d, _K in d, (a, c),
                        var.aval.dtype, grad and kind == "score_mod", _TRACED in d,
                        per_offset))
  for v in jaxpr.outvars:
    if isinstance(v, jex_core.Literal):
      continue
    shape = (1,) * (4 - len(v.aval.shape)) + tuple(v.aval.shape)
    if len(v.aval.shape) > 4 or shape[:2] != (1, 1):
      raise Refused(f"its {what} returns shape {tuple(v.aval.shape)}, not one that "
                    f"broadcasts to a block")
  return Split(kind, jaxpr, consts, block_q, block_k, values, inside_eqns, q_len, kv_len)


def refusal(fn: Optional[Callable], kind: str, block_q: int, block_k: int, q_len: int,
            kv_len: int, per_device: bool = False) -> Optional[str]:
  """Why ``fn`` cannot run inside the Pallas kernel (None: it can).

  ``per_device``: the kernel will run per device on its rows of the batch
  (a data-parallel mesh). A traced array read by the batch index (document
  ids passed into ``jit``) cannot be indexed by a device's global rows
  inside that ``shard_map`` (JAX cannot place the gather), so such a mod is
  refused there; concrete arrays and traced ones read by head or position
  (learned ALiBi slopes) are fine.
  """
  if fn is None:
    return None
  try:
    parts = split(fn, kind, block_q, block_k, q_len, kv_len)
  except Refused as e:
    return str(e)
  if per_device and any(v.per_batch and v.traced for v in parts.values):
    return (f"its {kind.replace('_', ' ')} reads a traced array by the batch index, which "
            f"the per-device kernel of a data-parallel mesh cannot index")
  return None
