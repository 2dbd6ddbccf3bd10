"""A static mask_mod runs in JAX's splash attention (the TPU default): its
numerics in the TPU interpreter against dense float64 attention with the mask
written out, its lowering for TPU, and the mods it cannot take (dispatch
passes over splash to blockwise, saying why)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import lowering
from attention_lab.kernels import mods
from attention_lab.kernels.splash import splash_attention
from conftest import assert_matches_float64

T, HEADS, DIM = 200, 2, 8


def _inputs(seed, kv_heads=HEADS):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, T, HEADS, DIM)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, T, kv_heads, DIM)), jnp.float32) for _ in range(2))
  return q, k, v


def _banded_per_head(batch, head, q_idx, kv_idx):
  """Head 0 sees 16 keys back, head 1 sees 64; query rows 3 mod 7 see none."""
  width = jnp.where(head == 0, 16, 64)
  return (kv_idx <= q_idx) & (q_idx - kv_idx < width) & (q_idx % 7 != 3)


def _written_out(kind, kv_lengths):
  """The visibility ``[batch, heads, T, T]`` in NumPy, as the docstrings define it."""
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  if kind == "prefix_lm":
    head_masks = [(j <= i) | (j < 50)] * HEADS
  else:
    head_masks = [(j <= i) & (i - j < width) & (i % 7 != 3)[:, :1].repeat(T, 1)
                  for width in (16, 64)]
  visible = np.stack(head_masks)[None]
  return visible & (j[None, None] < np.asarray(kv_lengths)[:, None, None, None])


@pytest.mark.parametrize("kind", [pytest.param("prefix_lm", marks=pytest.mark.slow),
                                  "banded_per_head"])
def test_splash_with_a_mask_mod_matches_float64(kind):
  mask_mod = mods.prefix_lm(50) if kind == "prefix_lm" else _banded_per_head
  q, k, v = _inputs(0)
  kv_lengths = np.array([T, 120])
  f = lambda q, k, v: splash_attention(q, k, v, mask_mod=mask_mod,
                                       kv_lengths=jnp.asarray(kv_lengths), interpret=True)
  visible = _written_out(kind, kv_lengths)

  def dense(q, k, v):                                  # float64
    s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(DIM)
    s = jnp.where(visible, s, -jnp.inf)
    w = jnp.exp(s - jnp.max(jnp.where(visible, s, -1e300), -1, keepdims=True))
    w = jnp.where(visible, w, 0.0)
    total = w.sum(-1, keepdims=True)
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)   # no key: zeros
    return jnp.einsum("bnts,bsnd->btnd", w, v)

  got = assert_matches_float64(f, dense, q, k, v, np.random.default_rng(1).normal(size=q.shape),
                               atol=2e-5, grad_atol=1e-4)
  if kind == "banded_per_head":
    assert np.all(np.asarray(got)[:, 3::7] == 0.0)       # rows with no key: zeros


def test_dispatch_lowers_splash_for_a_static_mask_mod_on_tpu():
  q = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16)
  fn = lambda q, k, v: kernels.dot_product_attention(q, k, v, mask_mod=mods.prefix_lm(100))
  assert "splash" in lowering.kernel_names(lowering.lower_for(fn, (q, q, q), "tpu"))
  grad = jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
  assert "splash" in lowering.kernel_names(lowering.lower_for(grad, (q, q, q), "tpu"))


def test_mods_splash_cannot_take_go_elsewhere_with_the_reason():
  shape = kernels.checks.AttentionShape((2,), 512, 512, 4, 4, 64, 64)
  ids = np.repeat(np.arange(4), 128)[None].repeat(2, 0)            # [batch, length]
  per_sequence = mods.document(ids)
  spec = kernels.select(kernels.requested_features(mask_mod=per_sequence), "tpu",
                        "bfloat16", shape, mask_mod=per_sequence)
  assert spec.name != "splash"
  assert "batch index" in kernels.get("splash").refuses(shape, per_sequence)
  grouped = shape._replace(kv_heads=2)
  assert "grouped" in kernels.get("splash").refuses(grouped, _banded_per_head)
  assert kernels.get("splash").refuses(grouped, mods.prefix_lm(100)) is None

  q = jnp.ones((2, 512, 4, 64), jnp.bfloat16)

  def traced(q, ids):                          # document ids known only inside jit
    return kernels.dot_product_attention(q, q, q, mask_mod=mods.document(ids),
                                         implementation="splash", interpret=True)

  with pytest.raises(ValueError, match="'splash' cannot run this call: its mask_mod "
                                       "reads traced arrays"):
    jax.jit(traced)(q, jnp.asarray(ids))
