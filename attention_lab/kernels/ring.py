"""Sequence-parallel ring attention (Liu et al. 2023) with ``shard_map``.

The sequence axis is split over the devices of one mesh axis. Each device
keeps its block of queries; the key/value blocks travel around the ring with
``ppermute``, one hop per step, and each step's block of scores is folded into
an online softmax (running max, normaliser and weighted sum, as in the
blockwise kernel), a chunk of keys at a time. After ``n`` steps every query
has seen every key, while no device holds more than its query block, two
key/value blocks and a ``[block, chunk]`` score tile: per-device memory falls
with the device count.

The backward pass is JAX's transpose of the loop (``ppermute`` transposes to
the reverse rotation); each step is rematerialised (``jax.checkpoint``), so the
backward saves only the carried statistics, not the score tiles.

Mesh: pass ``mesh=`` or run under ``jax.set_mesh(mesh)``; the mesh needs an
axis named ``axis_name`` (default ``"sequence"``). A ``"data"`` axis, if the
mesh has one, shards the batch as usual.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attention_lab.kernels import checks

SEQUENCE_AXIS = "sequence"
DATA_AXIS = "data"
_NEG = -1e30  # "minus infinity" that keeps exp() and max() finite
DEFAULT_CHUNK = 512


def _current_mesh(mesh):
  if mesh is not None:
    return mesh
  found = jax.sharding.get_abstract_mesh()
  if found is None or found.empty:
    return None
  return found


def _block_step(q, k, v, m, l, acc, q_pos, k_pos, kv_valid, *, scale, is_causal, window):
  """Folds one key/value block into the running softmax of one query block.

  q ``[b, tq, h, d]``; k, v ``[b, tk, h, d]``; m, l ``[b, h, tq]`` and acc
  ``[b, tq, h, dv]`` in float32 (float64 for float64 inputs); positions are
  global token indices.
  """
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=m.dtype) * scale
  allowed = kv_valid[:, None, None, :]                     # [b, 1, 1, tk]
  if is_causal:
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None]
  if window is not None:
    left, right = window
    delta = q_pos[:, None] - k_pos[None, :]
    allowed = allowed & ((delta <= left) & (-delta <= right))[None, None]
  s = jnp.where(allowed, s, _NEG)
  m_new = jnp.maximum(m, s.max(axis=-1))
  p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
  correction = jnp.exp(m - m_new)
  l_new = l * correction + p.sum(axis=-1)
  pv = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(acc.dtype))
  acc_new = acc * jnp.swapaxes(correction, 1, 2)[..., None] + pv
  return m_new, l_new, acc_new


def _ring_shard(q, k, v, kv_lengths, *, axis_name, varying_axes, scale, is_causal,
                window, block, chunk):
  """Runs on one device: its query block against every key block in turn."""
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  b, tq, h, _ = q.shape
  dv = v.shape[-1]
  q_pos = me * block + jnp.arange(tq)
  perm = [(i, (i + 1) % n) for i in range(n)]               # send to the next device

  step = functools.partial(_block_step, scale=scale, is_causal=is_causal, window=window)
  step = jax.checkpoint(step)                               # recompute tiles in backward

  def fold_block(k_blk, v_blk, owner, m, l, acc):
    """The held key block in chunks of ``chunk`` keys: scratch is a
    ``[tq, chunk]`` tile, never ``[tq, block]``."""
    chunks = block // chunk
    k_chunks = k_blk.reshape(b, chunks, chunk, *k_blk.shape[2:]).swapaxes(0, 1)
    v_chunks = v_blk.reshape(b, chunks, chunk, *v_blk.shape[2:]).swapaxes(0, 1)

    def one(carry, xs):
      m, l, acc = carry
      c, k_c, v_c = xs
      k_pos = owner * block + c * chunk + jnp.arange(chunk)
      kv_valid = k_pos[None, :] < kv_lengths[:, None]        # [b, chunk]
      return step(q, k_c, v_c, m, l, acc, q_pos, k_pos, kv_valid), None

    (m, l, acc), _ = jax.lax.scan(one, (m, l, acc), (jnp.arange(chunks), k_chunks, v_chunks))
    return m, l, acc

  def body(i, carry):
    k_blk, v_blk, m, l, acc = carry
    owner = (me - i) % n                                    # whose keys we hold now
    m, l, acc = fold_block(k_blk, v_blk, owner, m, l, acc)
    k_blk = jax.lax.ppermute(k_blk, axis_name, perm)
    v_blk = jax.lax.ppermute(v_blk, axis_name, perm)
    return k_blk, v_blk, m, l, acc

  # The running statistics differ per device like q (shard_map checks this).
  varying = functools.partial(jax.lax.pcast, axis_name=varying_axes, to="varying")
  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)   # softmax never below float32
  init = (k, v, varying(jnp.full((b, h, tq), _NEG, acc_dtype)),
          varying(jnp.zeros((b, h, tq), acc_dtype)),
          varying(jnp.zeros((b, tq, h, dv), acc_dtype)))
  _, _, m, l, acc = jax.lax.fori_loop(0, n, body, init)
  # Rows with no allowed key have l == 0: zeros, never NaN.
  inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
  return (acc * jnp.swapaxes(inv, 1, 2)[..., None]).astype(q.dtype)


def ring_attention(query, key, value, bias=None, mask=None, *,
                   scale: Optional[float] = None, is_causal: bool = False,
                   local_window_size=None, kv_lengths=None, mesh=None,
                   axis_name: str = SEQUENCE_AXIS, chunk: int = DEFAULT_CHUNK):
  """Attention with the sequence axis sharded over ``mesh.shape[axis_name]`` devices.

  Args:
    query: ``[batch, q_length, heads, head_dim]``; self-attention layout,
      ``q_length == kv_length`` (each device holds the same positions of both).
    key, value: ``[batch, kv_length, heads, dim]`` (grouped heads are repeated).
    bias, mask: not supported (a dense ``[q, kv]`` array would defeat the
      point); use ``kv_lengths`` for padding.
    local_window_size: ``(left, right)`` or an int for both: sliding window.
    kv_lengths: int ``[batch]``: keys at or past the length are padding.
    mesh: a ``jax.sharding.Mesh`` with an ``axis_name`` axis (default: the
      mesh set with ``jax.set_mesh``).
    chunk: keys per score tile inside a device (the block a device holds is
      folded in chunks, so per-device scratch is ``[block, chunk]``).

  Lengths that do not divide by the device count are padded internally (the
  padded keys masked, the padded queries dropped).

  Returns:
    ``[batch, q_length, heads, value_dim]`` in the query dtype.
  """
  if bias is not None or mask is not None:
    raise ValueError("ring_attention does not support 'mask' or 'bias'; pass kv_lengths "
                     "for padding")
  shape = checks.check_inputs(query, key, value, None, None, who="ring_attention")
  if len(shape.batch) != 1:
    raise ValueError(f"ring_attention expects one batch axis [batch, length, heads, dim], "
                     f"got query {tuple(query.shape)}")
  if shape.q_length != shape.kv_length:
    raise ValueError(f"ring_attention needs q_length == kv_length (self-attention), got "
                     f"{shape.q_length} and {shape.kv_length}")
  mesh = _current_mesh(mesh)
  if mesh is None or axis_name not in mesh.axis_names:
    raise ValueError(
        f"ring_attention needs a device mesh with a {axis_name!r} axis (pass mesh= or run "
        f"under jax.set_mesh(mesh)); got "
        f"{'no mesh' if mesh is None else 'axes ' + str(tuple(mesh.axis_names))}")
  if key.shape[-2] != query.shape[-2]:
    repeat = query.shape[-2] // key.shape[-2]
    key, value = jnp.repeat(key, repeat, axis=-2), jnp.repeat(value, repeat, axis=-2)
  batch, length = query.shape[0], query.shape[1]
  if kv_lengths is None:
    kv_lengths = jnp.full((batch,), length, jnp.int32)
  elif tuple(jnp.shape(kv_lengths)) != (batch,):
    raise ValueError(f"ring_attention: kv_lengths shape {tuple(jnp.shape(kv_lengths))} "
                     f"must be ({batch},)")
  window = None
  if local_window_size is not None:
    window = ((local_window_size, local_window_size) if isinstance(local_window_size, int)
              else tuple(local_window_size))
  scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

  n = mesh.shape[axis_name]
  block = -(-length // n)
  if block > chunk:
    block = -(-block // chunk) * chunk
  else:
    chunk = block
  pad = block * n - length
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    query, key, value = (jnp.pad(x, widths) for x in (query, key, value))
  batch_axis = DATA_AXIS if DATA_AXIS in mesh.axis_names and \
      batch % mesh.shape[DATA_AXIS] == 0 else None
  seq_spec = P(batch_axis, axis_name, None, None)
  fn = jax.shard_map(
      functools.partial(_ring_shard, axis_name=axis_name,
                        varying_axes=tuple(a for a in (batch_axis, axis_name) if a),
                        scale=scale,
                        is_causal=is_causal, window=window, block=block, chunk=chunk),
      mesh=mesh, in_specs=(seq_spec, seq_spec, seq_spec, P(batch_axis)),
      out_specs=seq_spec)
  args = (query, key, value, jnp.asarray(kv_lengths, jnp.int32))
  specs = (seq_spec, seq_spec, seq_spec, P(batch_axis))
  out = fn(*(_place(x, mesh, spec) for x, spec in zip(args, specs)))
  if pad:  # the padded length divides by the devices, the true one may not
    out = _place(out, mesh, P(batch_axis))[:, :length]
  return out


def _place(x, mesh, spec):
  """Meshes with explicit axis types (``jax.make_mesh``'s default) want inputs
  already laid out as ``in_specs`` says; automatic ones reshard by themselves."""
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  if not explicit:
    return x
  target = jax.sharding.NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
  return jax.sharding.reshard(x, target)


__all__ = ["DATA_AXIS", "SEQUENCE_AXIS", "ring_attention"]
