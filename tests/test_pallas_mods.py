"""score_mod / mask_mod fused in our Pallas kernel (issue 17): the built-in
mods in Pallas's interpreter against dense float64 attention written out
here (output, gradients wrt q, k, v and wrt the learned arrays a score_mod
closes over), and the mods it refuses (dispatch moves on to blockwise and
says why). Lowering for TPU and GPU is in test_lowering.py (and here for a
relative-position table, read per block offset).

72 tokens in 16 x 32 blocks: 5 query blocks by 3 key blocks, the last of
each padded, so values per query row and per key column cross block edges.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import lowering
from attention_lab.kernels import masks
from attention_lab.kernels import mods
from attention_lab.kernels.pallas import pallas_attention
from conftest import assert_matches_float64

B, T, H, D = 2, 72, 2, 8
BLOCKS = dict(block_q=16, block_k=32)
I, J = np.arange(T)[:, None], np.arange(T)[None, :]      # query, key positions


def _inputs(seed):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))
  return q, k, v, rng.normal(size=(B, T, H, D))


def _documents():
  """int32 ``[B, T]``: row 0 three documents, row 1 five (cuts off block edges)."""
  cuts = [[21, 50], [9, 30, 31, 60]]
  return np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts]).astype(np.int32)


def _dense(q, k, v, term, visible):
  """Softmax attention in float64: scores ``term(s)`` over ``visible``
  ``[B | 1, H | 1, T, T]``; a query with no visible key gives zeros."""
  s = term(jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(D))
  s = jnp.where(visible, s, -jnp.inf)
  w = jnp.exp(s - jnp.max(jnp.where(visible, s, -1e300), -1, keepdims=True))
  w = jnp.where(visible, w, 0.0)
  total = w.sum(-1, keepdims=True)
  w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
  return jnp.einsum("bnts,bsnd->btnd", w, v)


def _t5_buckets(relative, num_buckets=8, max_distance=20):
  """T5's bidirectional buckets of ``kv - q`` (Raffel et al. 2020), written out:
  per direction, half the buckets exact distances, half log-spaced up to
  ``max_distance``."""
  n = -np.asarray(relative)
  half = num_buckets // 2
  offset = np.where(n < 0, half, 0)
  n = np.abs(n)
  exact = half // 2
  log_bucket = exact + np.floor(np.log(np.maximum(n, 1) / exact)
                                / np.log(max_distance / exact) * (half - exact))
  return offset + np.where(n < exact, n, np.minimum(log_bucket, half - 1)).astype(int)


# name -> (learned array, kernel keywords(learned, ids), float64 term(learned)(s), visible)
CASES = {
    # Learned ALiBi slopes (one value per head, read per program), causal.
    "alibi_learned_causal": (
        mods.alibi_slopes(H) * np.array([1.5, 0.5], np.float32),
        lambda p, ids: dict(score_mod=mods.alibi(p), is_causal=True),
        lambda p: lambda s: s + p[None, :, None, None] * (J - I),
        np.broadcast_to(J <= I, (1, 1, T, T))),
    # A learned soft-cap scale (a scalar the kernel's blocks all read),
    # prefix-LM with a prefix per sequence (static: its block mask skips 40%
    # of the blocks; the second sequence's prefix is 0, plain causal) and
    # padded keys in the second sequence.
    "softcap_learned_prefix_lm_kv_lengths": (
        np.array([2.5], np.float32),
        lambda p, ids: dict(score_mod=mods.softcap(p[0]), kv_lengths=jnp.array([T, 37]),
                            mask_mod=mods.prefix_lm(np.array([20, 0]))),
        lambda p: lambda s: p[0] * jnp.tanh(s / p[0]),
        ((J <= I) | (J < np.array([20, 0])[:, None, None, None]))
        & (J < np.array([T, 37])[:, None, None, None])),
    # Document ids traced inside jit (a value per query row and per key
    # column), with fixed symmetric ALiBi.
    "documents_traced_alibi": (
        None,
        lambda p, ids: dict(mask_mod=mods.document(ids),
                            score_mod=mods.alibi(mods.alibi_slopes(H), symmetric=True)),
        lambda p: lambda s: s - mods.alibi_slopes(H).astype(np.float64)[None, :, None, None]
        * np.abs(J - I),
        (_documents()[:, :, None] == _documents()[:, None, :])[:, None]),
    # A learned relative-position table (the Conformer's bias): a gather by
    # kv_idx - q_idx, evaluated before the kernel once per block offset
    # (7 offsets of 16 x 32 blocks), with padded keys in the second sequence;
    # and causal, where the causal band leaves some block pairs unvisited.
    "relative_bias_learned_kv_lengths": (
        np.random.default_rng(3).normal(size=(H, 9)).astype(np.float32),
        lambda p, ids: dict(score_mod=mods.relative_bias(p, 4), kv_lengths=jnp.array([T, 37])),
        lambda p: lambda s: s + p[:, np.clip(J - I, -4, 4) + 4][None],
        np.broadcast_to(J < np.array([T, 37])[:, None, None, None], (B, 1, T, T))),
    "relative_bias_learned_causal": (
        np.random.default_rng(4).normal(size=(H, 9)).astype(np.float32),
        lambda p, ids: dict(score_mod=mods.relative_bias(p, 4), is_causal=True),
        lambda p: lambda s: s + p[:, np.clip(J - I, -4, 4) + 4][None],
        np.broadcast_to(J <= I, (1, 1, T, T))),
    # T5's learned bucketed bias: a log-scale bucket of kv_idx - q_idx, also
    # gathered once per block offset; padded keys in the second sequence.
    "t5_buckets_learned_kv_lengths": (
        np.random.default_rng(5).normal(size=(H, 8)).astype(np.float32),
        lambda p, ids: dict(score_mod=mods.t5_relative_bias(p, max_distance=20),
                            kv_lengths=jnp.array([T, 37])),
        lambda p: lambda s: s + p[:, _t5_buckets(J - I)][None],
        np.broadcast_to(J < np.array([T, 37])[:, None, None, None], (B, 1, T, T))),
}


@pytest.mark.parametrize("name", CASES)
def test_pallas_with_mods_matches_float64(name):
  learned, keywords, term, visible = CASES[name]
  q, k, v, cot = _inputs(0)
  ids = jnp.asarray(_documents())

  @jax.jit
  def f(q, k, v, p, ids):                  # the ids are traced: values computed in jit
    return kernels.dot_product_attention(q, k, v, implementation="pallas", interpret=True,
                                         **keywords(p, ids), **BLOCKS)

  as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
  f64 = lambda p: lambda q, k, v: _dense(q, k, v, term(p), visible)
  if learned is None:
    with jax.enable_x64(True):
      dense = f64(None)
    assert_matches_float64(lambda q, k, v: f(q, k, v, None, ids), dense, q, k, v, cot,
                           atol=2e-5, grad_atol=1e-4)
    return
  # A learned array: its gradient too, from the same backward pass.
  loss = lambda q, k, v, p: jnp.sum(f(q, k, v, p, ids) * cot)
  got = f(q, k, v, jnp.asarray(learned), ids)
  grads = jax.grad(loss, (0, 1, 2, 3))(q, k, v, jnp.asarray(learned))
  with jax.enable_x64(True):
    args = [as64(x) for x in (q, k, v, learned)]
    want = f64(args[3])(*args[:3])
    want_grads = jax.grad(lambda q, k, v, p: jnp.sum(f64(p)(q, k, v) * cot),
                          (0, 1, 2, 3))(*args)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # A gradient worth checking: each entry sizeable, or exactly zero where no
  # visible pair reads it (a causal table's columns for keys after the query).
  learned_grad = np.abs(np.asarray(want_grads[3]))
  assert np.all((learned_grad > 1e-2) | (learned_grad == 0)) and learned_grad.max() > 1e-2
  for which, g, w in zip(("q", "k", "v", "learned"), grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=which)


@pytest.mark.slow
def test_tpu_layout_with_a_learned_score_mod_and_a_document_mask_matches_float64():
  """The TPU program (128-wide blocks, so 200 tokens are 2 x 2 blocks) in
  the TPU interpreter: learned ALiBi slopes and a traced document mask.
  (Slow, 20 s: the GPU layout above runs the same mod code, and
  test_lowering.py lowers it for TPU.)"""
  t = 200
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, H, D)), jnp.float32) for _ in range(3))
  ids = np.searchsorted([70, 150], np.arange(t), side="right")[None].astype(np.int32)
  slopes = mods.alibi_slopes(H) * np.float32(4.0)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  visible = (ids[:, :, None] == ids[:, None, :])[:, None] & (j <= i)

  def f(q, k, v, p, ids):
    return pallas_attention(q, k, v, score_mod=mods.alibi(p), mask_mod=mods.document(ids),
                            is_causal=True, target="tpu_interpret")

  def dense(q, k, v, p):
    return _dense(q, k, v, lambda s: s + p[None, :, None, None] * (j - i), visible)

  cot = rng.normal(size=q.shape)
  loss = lambda *a: jnp.sum(f(*a) * cot)
  got = f(q, k, v, jnp.asarray(slopes), jnp.asarray(ids))
  grads = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, jnp.asarray(slopes), jnp.asarray(ids))
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, slopes)]
    want = dense(*args)
    want_grads = jax.grad(lambda *a: jnp.sum(dense(*a) * cot), (0, 1, 2, 3))(*args)
  np.testing.assert_allclose(got, want, atol=2e-5)
  for which, g, w in zip(("q", "k", "v", "slopes"), grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=which)


def _skewed_table(score, batch, head, q_idx, kv_idx):
  """A gather by both positions, but not through ``kv_idx - q_idx`` alone:
  ``table[head, clip(2 j - i, -4, 4) + 4]``."""
  table = jnp.zeros((H, 9), jnp.float32)
  return score + table[head, jnp.clip(2 * kv_idx - q_idx, -4, 4) + 4]


def _pair_table(score, batch, head, q_idx, kv_idx):
  """A true 2-D gather: ``table[i mod 8, j mod 8]``."""
  return score + jnp.arange(64, dtype=jnp.float32).reshape(8, 8)[q_idx % 8, kv_idx % 8]


@pytest.mark.parametrize("mod", [_skewed_table, _pair_table], ids=["skewed", "pair"])
def test_mods_the_kernel_cannot_lower_are_refused_and_go_to_blockwise(caplog, mod):
  """A gather indexed by both positions otherwise than through ``j - i``
  is refused by name; dispatch moves on to blockwise on GPU and TPU and logs
  why, while ALiBi (a gather by head only) and a relative-position table
  (``table[head, j - i]``, one tile per block offset) stay fused."""
  shape = kernels.checks.AttentionShape((B,), 2048, 2048, H, H, 64, 64)
  reason = kernels.get("pallas").refuses(shape, None, mod)
  assert "computes concatenate, gather per (query, key) pair" in reason, reason
  assert kernels.get("pallas").refuses(shape, mods.document(_documents()),
                                       mods.alibi(H)) is None
  assert kernels.get("pallas").refuses(
      shape, None, mods.relative_bias(np.zeros((H, 9), np.float32), 4)) is None
  features = kernels.requested_features(score_mod=mod)
  kernels.dispatch._LOGGED_CHOICES.clear()
  with caplog.at_level(logging.INFO, logger="absl"):
    for platform in ("gpu", "tpu"):
      assert kernels.select(features, platform, "float32", shape, score_mod=mod).name \
          == "blockwise"
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert "pallas (its score mod computes concatenate, gather per (query, key)" in logged, logged
  q, k, v, _ = _inputs(1)
  with pytest.raises(ValueError, match=r"'pallas' cannot run this call: its score mod "
                                       r"computes concatenate, gather"):
    kernels.dot_product_attention(q, k, v, implementation="pallas", score_mod=mod,
                                  interpret=True)
  with pytest.raises(ValueError, match=r"pallas_attention: its score mod computes .*gather.*"
                                       r"blockwise takes any"):
    pallas_attention(q, k, v, score_mod=mod, interpret=True)


def test_relative_bias_in_the_tpu_layout_matches_float64():
  """The TPU program (128-wide blocks: 200 tokens are 2 x 2 blocks, 3 block
  offsets) in the TPU interpreter with a learned relative-position table:
  output and gradients wrt q, k, v and the table against float64."""
  t, distance = 200, 6
  rng = np.random.default_rng(5)
  q, k, v, cot = (jnp.asarray(rng.normal(size=(1, t, H, D)), jnp.float32) for _ in range(4))
  table = rng.normal(size=(H, 2 * distance + 1)).astype(np.float32)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  column = np.clip(j - i, -distance, distance) + distance

  def f(q, k, v, p):
    return pallas_attention(q, k, v, score_mod=mods.relative_bias(p, distance),
                            target="tpu_interpret")

  def dense(q, k, v, p):
    return _dense(q, k, v, lambda s: s + p[:, column][None], np.ones((1, 1, t, t), bool))

  got = f(q, k, v, jnp.asarray(table))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2, 3)))(
      q, k, v, jnp.asarray(table))
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, table)]
    want = dense(*args)
    cot64 = np.asarray(cot, np.float64)
    want_grads = jax.grad(lambda *a: jnp.sum(dense(*a) * cot64), (0, 1, 2, 3))(*args)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.abs(np.asarray(want_grads[3])).max() > 0.5          # a gradient worth checking
  for which, g, w in zip(("q", "k", "v", "table"), grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=which)


def test_relative_bias_lowers_the_fused_kernel_for_tpu_and_cuda():
  """``jax.export`` for TPU (Mosaic's checks under an abstract TPU mesh)
  and CUDA (Triton), causal over 3 x 3 TPU blocks: the forward and both
  backward kernels carry the relative-position table (its gradient
  included), no fallback. (Unmasked: test_lowering_models.py's
  speech_conformer.)"""
  def loss(q, k, v, table):
    out = kernels.dot_product_attention(q, k, v, score_mod=mods.relative_bias(table, 32),
                                        is_causal=True)
    return jnp.sum(out.astype(jnp.float32))

  qkv = jax.ShapeDtypeStruct((2, 384, 4, 64), jnp.float32)
  args = (qkv, qkv, qkv, jax.ShapeDtypeStruct((4, 65), jnp.float32))
  grad = jax.grad(loss, (0, 1, 2, 3))
  for platform, names in lowering.fused_kernels(grad, args).items():
    assert lowering.FLASH_KERNELS <= names, (platform, names)


MESH_CHECK = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from attention_lab import kernels
from attention_lab.kernels import mods
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(4, 48, 2, 8)), jnp.float32) for _ in range(3))
ids = np.stack([np.searchsorted(c, np.arange(48), side="right")
                for c in ([10], [20, 30], [5], [40])]).astype(np.int32)
slopes = jnp.asarray(mods.alibi_slopes(2))

def loss(q, k, v, slopes, ids, impl, **kw):
  out = kernels.dot_product_attention(q, k, v, implementation=impl, score_mod=mods.alibi(slopes),
                                      mask_mod=mods.document(ids), **kw)
  return jnp.sum(out * jnp.cos(out)), out

grad = lambda impl, ids, **kw: jax.value_and_grad(
    lambda q, k, v, s: loss(q, k, v, s, ids, impl, **kw), (0, 1, 2, 3), has_aux=True)
(_, want), want_grads = grad("reference", ids)(q, k, v, slopes)
with jax.set_mesh(mesh):
  rows = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  fused = jax.jit(grad("pallas", ids, interpret=True, block_q=16, block_k=16))
  (_, got), grads = fused(rows(q), rows(k), rows(v), slopes)
  try:
    jax.jit(lambda q, ids: loss(q, q, q, slopes, ids, "pallas", interpret=True))(
        rows(q), jnp.asarray(ids))
    print("traced ids: ran")
  except ValueError as e:
    print("traced ids:", e)
print("errors", float(jnp.max(jnp.abs(got - want))),
      *(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, want_grads)))
"""


@pytest.mark.slow
def test_per_device_rows_read_their_own_documents_on_a_data_mesh():
  """Under a 2-device data mesh dispatch runs the kernel per device on its
  rows: a document mask must read each row's own ids (global batch index),
  output and gradients as the reference's; traced ids there are refused
  with the reason (slow: a fresh process with two CPU devices)."""
  from conftest import run_on_devices
  out = run_on_devices(2, MESH_CHECK)
  assert ("traced ids: attention kernel 'pallas' cannot run this call: its mask mod reads "
          "a traced array by the batch index") in out, out
  errors = [float(x) for x in out.split("errors")[1].split()]
  assert errors[0] < 2e-5 and max(errors[1:]) < 2e-4, errors


# ---------------------------------------------------------------- full blocks run unmasked

@pytest.mark.parametrize("form", [dict(local_window_size=(40, 24)),
                                  dict(is_causal=True, local_window_size=(40, 0)),
                                  dict(is_causal=True)],
                         ids=["window", "causal_window", "causal"])
def test_full_blocks_of_the_band_run_unmasked_and_match_float64(form):
  """Blocks of 16 over 72 tokens: in all three kernels the band's full
  blocks (every pair visible, ranges worked out from the block corners)
  skip the mask, the rest are masked; against float64 with the band written
  out here, output and gradients."""
  from attention_lab.kernels.pallas import _Setting
  causal, window = form.get("is_causal", False), form.get("local_window_size")
  st = _Setting(T, T, 16, 16, 1.0, causal, window, tpu=False)
  assert st.unmasked_full
  full_keys = [np.subtract(*st.full_keys(i, T)[::-1]) for i in range(st.nq)]
  full_queries = [np.subtract(*st.full_queries(j, T)[::-1]) for j in range(st.nk)]
  assert max(full_keys) > 0 and max(full_queries) > 0     # the shapes have full blocks
  q, k, v, cot = _inputs(7)
  visible = np.ones((T, T), bool)
  if causal:
    visible &= J <= I
  if window is not None:
    visible &= (J >= I - window[0]) & (J <= I + window[1])
  f = lambda q, k, v: pallas_attention(q, k, v, block_q=16, block_k=16, interpret=True, **form)
  assert_matches_float64(f, lambda q, k, v: _dense(q, k, v, lambda s: s, visible[None, None]),
                         q, k, v, cot, atol=2e-5, grad_atol=1e-4)


def test_static_document_mask_runs_its_full_blocks_unmasked_and_matches_float64():
  """Concrete document ids: the block table's full blocks (first in each
  list) skip the mask in all three kernels, its partial ones are masked;
  against float64, output and gradients."""
  ids = _documents()
  table = masks.block_mask(mods.document(ids), B, H, T, T, 16, 16)
  assert (table.state == masks.FULL).any() and (table.state == masks.PARTIAL).any()
  q, k, v, cot = _inputs(8)
  visible = (ids[:, :, None] == ids[:, None, :])[:, None]
  f = lambda q, k, v: pallas_attention(q, k, v, mask_mod=mods.document(ids), block_q=16,
                                       block_k=16, interpret=True)
  assert_matches_float64(f, lambda q, k, v: _dense(q, k, v, lambda s: s, visible),
                         q, k, v, cot, atol=2e-5, grad_atol=1e-4)
