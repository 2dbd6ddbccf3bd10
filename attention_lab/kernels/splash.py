"""JAX's splash attention (TPU) under the kernel contract.

Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) is the
TPU flash kernel MaxText and Keras use: masks are *functions* of positions,
turned once per shape into block-sparse metadata so that empty blocks are
skipped; segment ids separate packed or padded sequences; one K/V head can
serve many query heads. It is well kept and tuned for every TPU generation,
so it is the TPU default here; our own ``pallas`` kernel stays the readable
one.

This wrapper maps the contract onto it:

* layout ``[batch..., length, heads, dim]`` -> splash's ``[heads, length, dim]``,
  ``vmap``-ed over the batch;
* causal and window -> splash's static ``CausalMask`` / ``LocalMask``;
* a static ``mask_mod`` (indices and concrete arrays; the same for every
  sequence) -> one ``NumpyMask`` per head, evaluated once per shape, so its
  empty blocks are skipped as splash skips any mask's (``splash_refusal``
  says when a mask_mod cannot be one, and dispatch passes over splash);
* ``kv_lengths`` (and the padding of lengths to whole blocks) -> segment ids;
* grouped K/V heads -> the multi-query form, ``vmap``-ed over the K/V heads
  (K/V are never repeated in memory);
* ``scale`` -> applied to the queries (splash does not scale);
* head dims padded to the 128 TPU lanes, lengths to whole blocks.

Rows with no visible key return zeros (splash itself needs every row to see
a key, so such rows attend to their own sequence's keys and are then zeroed).
Dense masks and biases are not expressible as splash masks: the registry sends
those calls to another kernel and logs why.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from attention_lab.kernels import checks
from attention_lab.kernels import masks
from attention_lab.kernels.masks import _window_sides
from attention_lab.kernels.reference import heads_major

LANES = 128
BLOCK_CHOICES = (512, 256, 128)   # the largest that divides the padded length
# A mask_mod becomes a dense NumPy mask per head while tracing: beyond this
# many entries blockwise, which evaluates it block by block, is the better home.
STATIC_MASK_LIMIT = 1 << 27


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _block(padded: int) -> int:
  return next(b for b in BLOCK_CHOICES if padded % b == 0)


def _static_mask(q_len: int, kv_len: int, is_causal: bool, window):
  """The splash mask object for one head ``[q_len, kv_len]``."""
  shape = (q_len, kv_len)
  if window is None:
    return splash.CausalMask(shape) if is_causal else splash.FullMask(shape)
  left, right = window
  if is_causal:
    right = 0 if right is None else min(right, 0)
  return splash.LocalMask(shape, window_size=(left, right), offset=0)


def splash_refusal(shape: checks.AttentionShape, mask_mod, score_mod=None) -> Optional[str]:
  """Why splash cannot take this ``mask_mod`` (None: it can). Splash masks
  are static and per head: the mod must read only indices and concrete
  arrays, not the batch index, and (with grouped K/V heads) not the head.
  (It has no score_mod at all: its features say so.)"""
  if mask_mod is None:
    return None
  flat = math.prod(shape.batch) if shape.batch else 1
  dependence = masks.mod_dependence(mask_mod, flat, shape.heads)
  if dependence is None:
    return "its mask_mod reads traced arrays (a static mask is needed)"
  per_batch, per_head = dependence
  if per_batch:
    return "its mask_mod depends on the batch index (splash masks are per head)"
  if per_head and 1 < shape.kv_heads < shape.heads:
    return "its mask_mod depends on the head and K/V heads are grouped"
  entries = (shape.heads if per_head else 1) * shape.q_length * shape.kv_length
  if entries > STATIC_MASK_LIMIT:
    return f"its mask_mod would be a {entries:,}-entry static mask"
  return None


def _mod_masks(mask_mod, shape, q_padded, kv_padded, is_causal, window):
  """``mask_mod`` (with causal / window) as splash's per-head masks.

  Returns bool ``[heads | 1, q_padded, kv_padded]`` and int ``[heads | 1,
  q_length]``, each row's first visible key (``kv_length`` if none). Rows with
  no visible key, and padded rows, see every key in the splash mask (splash
  needs a key in every row); their outputs are zeroed afterwards.
  """
  flat = math.prod(shape.batch) if shape.batch else 1
  visible = masks.static_mask(mask_mod, flat, shape.heads, shape.q_length, shape.kv_length,
                              is_causal=is_causal, window=window)[0]    # [h|1, q, kv]
  empty = ~visible.any(-1)
  first = np.where(empty, shape.kv_length, visible.argmax(-1))
  padded = np.ones((visible.shape[0], q_padded, kv_padded), bool)
  padded[:, :shape.q_length, :] = False
  padded[:, :shape.q_length, :shape.kv_length] = visible
  padded[:, :shape.q_length][empty] = True
  return padded, first


def _kernel(q_padded, kv_padded, heads, is_causal, window, is_mqa, interpret,
            head_masks=None):
  """A splash kernel for one static setting. Its block metadata is computed
  in NumPy from the mask functions while tracing (splash caches that work per
  mask); the kernel object is not kept, since it holds arrays made during one
  trace. ``head_masks`` (``[heads | 1, q_padded, kv_padded]``): a mask_mod's
  masks, which then replace causal / window (they include them)."""
  if head_masks is None:
    head_mask = _static_mask(q_padded, kv_padded, is_causal, window)
    mask = splash.MultiHeadMask([head_mask] * heads)
  else:
    mask = splash.MultiHeadMask([splash.NumpyMask(head_masks[h % len(head_masks)])
                                 for h in range(heads)])
  block_q, block_kv = _block(q_padded), _block(kv_padded)
  sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)
  make = splash.make_splash_mqa if is_mqa else splash.make_splash_mha
  return make(mask=mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
              interpret=interpret)


def splash_attention(query, key, value, bias=None, mask=None, *,
                     scale: Optional[float] = None, is_causal: bool = False,
                     local_window_size=None, kv_lengths=None, mask_mod=None,
                     interpret: bool = False):
  """Splash attention; arguments and shapes as ``reference_attention``.

  Args:
    query: ``[batch..., q_length, heads, head_dim]``.
    key: ``[batch..., kv_length, kv_heads, head_dim]``.
    value: ``[batch..., kv_length, kv_heads, value_dim]``; ``value_dim`` must
      equal ``head_dim`` (splash's layout).
    bias, mask: not supported (ValueError); use ``kv_lengths`` for padding.
    kv_lengths: int ``[batch...]``, number of valid keys per sequence.
    mask_mod: ``g(batch, head, q_idx, kv_idx) -> bool`` (``kernels.mods``)
      of indices and concrete arrays, not of the batch index; evaluated once
      per shape into splash's masks (``splash_refusal`` says what it cannot
      take: ValueError).
    interpret: run the Pallas program in the TPU interpreter (CPU tests).

  Returns:
    ``[batch..., q_length, heads, value_dim]`` in the query dtype.
  """
  checks.refuse_dense("splash", bias, mask)
  shape = checks.check_inputs(query, key, value, who="splash_attention")
  if shape.value_dim != shape.head_dim:
    raise ValueError(f"splash_attention: value_dim {shape.value_dim} must equal head_dim "
                     f"{shape.head_dim}")
  batch = shape.batch
  flat = math.prod(batch) if batch else 1
  window = None if local_window_size is None else _window_sides(local_window_size)
  scale = shape.head_dim ** -0.5 if scale is None else scale
  q_padded = _round_up(shape.q_length, LANES)
  kv_padded = _round_up(shape.kv_length, LANES)
  dim = _round_up(shape.head_dim, LANES)
  group = shape.heads // shape.kv_heads
  is_mqa = group != shape.heads or shape.kv_heads == 1
  head_masks = first_key = None
  if mask_mod is not None:
    refusal = splash_refusal(shape, mask_mod)
    if refusal:
      raise ValueError(f"splash_attention: {refusal}; blockwise takes any mask_mod")
    head_masks, first_key = _mod_masks(mask_mod, shape, q_padded, kv_padded, is_causal,
                                       window)
    if len(head_masks) > 1 and group == 1:
      is_mqa = False     # one kernel over all heads, each with its own mask
  kernel = _kernel(q_padded, kv_padded, group if is_mqa else shape.heads,
                   is_causal, window, is_mqa, interpret, head_masks)

  lengths = checks.kv_lengths_vector("splash_attention", kv_lengths, shape)

  q = heads_major((query.astype(jnp.float32) * scale).astype(query.dtype), len(batch),
                  q_padded, dim)
  k = heads_major(key, len(batch), kv_padded, dim)
  v = heads_major(value, len(batch), kv_padded, dim)
  # Segment 0: the valid keys and every query; 1: padded keys. A sequence
  # with no valid key attends to all of its keys instead (splash needs a key
  # in every row) and is zeroed below.
  kv_pos = jnp.arange(kv_padded)
  kv_segment = jnp.where((kv_pos[None] < lengths[:, None]) | (lengths[:, None] == 0), 0, 1)
  q_segment = jnp.zeros((flat, q_padded), jnp.int32)

  def one(q, k, v, q_seg, kv_seg):
    segments = splash.SegmentIds(q=q_seg, kv=kv_seg.astype(jnp.int32))
    if not is_mqa:
      return kernel(q, k, v, segment_ids=segments)
    q = q.reshape(shape.kv_heads, group, q_padded, dim)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(
        q, k, v).reshape(shape.heads, q_padded, dim)

  out = jax.vmap(one)(q, k, v, q_segment, kv_segment)            # [b, n, t, d]
  out = jnp.swapaxes(out[:, :, :shape.q_length, :shape.value_dim], 1, 2)
  out = out.reshape(batch + out.shape[1:]).astype(query.dtype)
  if first_key is not None:
    # Rows with no visible key: the mask_mod's first visible key is padding
    # (or there is none).
    has_key = jnp.asarray(first_key)[None] < lengths[:, None, None]      # [b, h|1, q]
    has_key = jnp.swapaxes(has_key, 1, 2).reshape(batch + (shape.q_length, -1, 1))
    return jnp.where(has_key, out, jnp.zeros((), out.dtype))
  # Rows with no visible key: every key padded, or (with a window) every key
  # in the band padded.
  q_pos = jnp.arange(shape.q_length)
  first, last = jnp.zeros_like(q_pos), jnp.full_like(q_pos, shape.kv_length - 1)
  if window is not None:
    first = jnp.maximum(first, q_pos - window[0])
    last = jnp.minimum(last, q_pos + window[1])
  if is_causal:
    last = jnp.minimum(last, q_pos)
  has_key = (first[None] < lengths[:, None]) & (first <= last)[None]   # [b, q]
  has_key = has_key.reshape(batch + (shape.q_length, 1, 1))
  return jnp.where(has_key, out, jnp.zeros((), out.dtype))
