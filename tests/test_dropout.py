"""Attention dropout inside the fused kernels (our Pallas kernel, in the GPU
and TPU layouts in their interpreters, and ``blockwise``).

Both draw the documented counter-based mask (``kernels.dropout``), written
out here in uint32 NumPy, and regenerate it in their backward passes: the
output and gradients must be those of dense float64 attention with that
mask applied to the softmax weights (kept weights scaled by 1/keep).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from conftest import assert_matches_float64
from attention_lab.kernels.blockwise import blockwise_attention
from attention_lab.kernels.pallas import pallas_attention


def _lowbias32(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def _keep_mask(seeds, keep_prob, batch, heads, q_len, kv_len, broadcast):
  """The documented dropout mask, written out in uint32 NumPy:
  ``[batch, heads, q_len, kv_len]`` bool."""
  s0, s1 = np.asarray(seeds).astype(np.int32).view(np.uint32)
  q = np.arange(q_len, dtype=np.uint32)[:, None]
  k = np.arange(kv_len, dtype=np.uint32)[None, :]
  with np.errstate(over="ignore"):
    h = _lowbias32(s0 ^ (q * np.uint32(0x9E3779B9)))
    h = _lowbias32(h ^ (k * np.uint32(0x85EBCA6B)) ^ s1)
    if broadcast:
      h = np.broadcast_to(h, (batch, heads, q_len, kv_len))
    else:
      row = np.arange(batch * heads, dtype=np.uint32).reshape(batch, heads, 1, 1)
      h = _lowbias32(h[None, None] ^ row)
  return (h >> np.uint32(8)) < np.uint32(round(keep_prob * (1 << 24)))


def _dropped_attention64(visible, keep, rate):
  """Dense attention (run under float64) with the written-out dropout mask:
  ``f(q [b, t, n, d], k, v [b, t, kvh, d])``, K/V heads repeated to ``n``,
  softmax over ``visible``, kept weights scaled by ``1 / (1 - rate)``."""
  def dense(q, k, v):
    k, v = (np.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(visible, s, -jnp.inf)
    w = jax.nn.softmax(s, axis=-1) * jnp.where(keep, 1 / (1 - rate), 0.0)
    return jnp.einsum("bnts,bsnd->btnd", w, v)
  return dense


KERNELS = {
    "pallas_gpu_layout": functools.partial(pallas_attention, block_q=32, block_k=64,
                                           target="interpret"),
    "pallas_tpu_layout": functools.partial(pallas_attention, block_q=32, block_k=64,
                                           target="tpu_interpret"),
    "blockwise": functools.partial(blockwise_attention, block_q=32, block_k=64),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "per_head"])
def test_dropout_matches_its_written_out_mask_forward_and_gradients(broadcast, kernel):
  """Causal, padded keys, several blocks; with the per-head mask the 4 query
  heads share 2 K/V heads (blockwise never copies them)."""
  rate, rng = 0.3, jax.random.PRNGKey(7)
  b, t, n, kvh, d = 2, 150, 4, 2, 8
  data = np.random.default_rng(4)
  q = jnp.asarray(data.normal(size=(b, t, n, d)), jnp.float32)
  k, v = (jnp.asarray(data.normal(size=(b, t, kvh, d)), jnp.float32) for _ in range(2))
  kv_lengths = jnp.array([150, 90])
  f = lambda q, k, v: KERNELS[kernel](
      q, k, v, is_causal=True, kv_lengths=kv_lengths, dropout_rate=rate, dropout_rng=rng,
      broadcast_dropout=broadcast)
  seeds = np.asarray(jax.random.bits(rng, (2,), jnp.uint32))
  keep = _keep_mask(seeds.view(np.int32), 1 - rate, b, n, t, t, broadcast)
  visible = np.tril(np.ones((t, t), bool))[None, None] & (
      np.arange(t)[None, None, None, :] < np.asarray(kv_lengths)[:, None, None, None])

  dense = _dropped_attention64(visible, keep, rate)

  assert_matches_float64(f, dense, q, k, v, data.normal(size=q.shape), atol=3e-5,
                         grad_atol=1e-4)
  assert abs(keep.mean() - (1 - rate)) < 0.01                  # it drops what it says
  assert broadcast or not np.array_equal(keep[0, 0], keep[1, 1])


def test_blockwise_dropout_needs_a_key_and_a_rate_below_one():
  x = jnp.ones((1, 16, 2, 8))
  with pytest.raises(ValueError, match="blockwise_attention: dropout_rate > 0 needs dropout_rng"):
    blockwise_attention(x, x, x, dropout_rate=0.1)
  with pytest.raises(ValueError, match="dropout_rate must be below 1, got 1.0"):
    blockwise_attention(x, x, x, dropout_rate=1.0, dropout_rng=jax.random.PRNGKey(0))


def test_dispatch_keeps_long_dropout_on_the_fused_cpu_kernel():
  """Dropout no longer sends a long sequence to the materialised reference."""
  spec = kernels.select(kernels.requested_features(dropout=True), "cpu",
                        shape=kernels.checks.AttentionShape((1,), 2048, 2048, 4, 4, 64, 64))
  assert spec.name == "blockwise"


def test_blockwise_dropout_with_placed_blocks_and_the_queries_outer_walk(monkeypatch):
  """blockwise's visits placed on a grain of 8 under a causal window of 30
  keys (the backward then walks query blocks outer, over the forward's own
  visits, trimmed to the keys they need), per-head
  dropout and grouped K/V heads: the regenerated mask must be the
  written-out one wherever the blocks start and end."""
  from attention_lab.kernels import blockwise
  from attention_lab.kernels import masks
  monkeypatch.setattr(blockwise, "GRAIN", 8)
  monkeypatch.setattr(blockwise, "_trim_pays", lambda *_: True)
  rate, rng = 0.3, jax.random.PRNGKey(11)
  b, t, n, kvh, d = 1, 150, 4, 2, 8
  data = np.random.default_rng(5)
  q = jnp.asarray(data.normal(size=(b, t, n, d)), jnp.float32)
  k, v = (jnp.asarray(data.normal(size=(b, t, kvh, d)), jnp.float32) for _ in range(2))
  table = masks.band_block_mask(t, t, 8, 8, is_causal=True, window=(30, 0))
  visits = blockwise._visits(table.state, 32, 64, 8, 8, t, t)
  assert blockwise._queries_outer(visits, 64)                   # the queries-outer walk
  assert len(visits["fwd"].groups) > 1                           # over trimmed visits
  f = lambda q, k, v: blockwise_attention(
      q, k, v, is_causal=True, local_window_size=(30, 0), dropout_rate=rate, dropout_rng=rng,
      broadcast_dropout=False, block_q=32, block_k=64)
  seeds = np.asarray(jax.random.bits(rng, (2,), jnp.uint32))
  keep = _keep_mask(seeds.view(np.int32), 1 - rate, b, n, t, t, False)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  visible = ((j <= i) & (j >= i - 30))[None, None]

  dense = _dropped_attention64(visible, keep, rate)

  assert_matches_float64(f, dense, q, k, v, data.normal(size=q.shape), atol=3e-5,
                         grad_atol=1e-4)
