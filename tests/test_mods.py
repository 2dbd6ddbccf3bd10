"""score_mod / mask_mod (issue 17): the built-in mods and the hooks in
``reference`` and ``blockwise``, against float64 NumPy written out here.

Every expected value below comes from NumPy in float64: the attention, its
backward (``dS = P * (dP - rowsum(dP * P))``) and each mod's derivative are
written out in this file, never taken from the code under test. The kernels see
the same rounded inputs (float32 or bfloat16) as NumPy (in float64), so
tolerances cover the kernels' arithmetic only.

Blockwise cases run at 300 tokens with 64 x 128 blocks (5 x 3 blocks, padded
ends), grouped K/V heads (4 query heads, 2 K/V heads), forward and gradients
wrt q, k, v and the arrays the score_mod closes over.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import masks
from attention_lab.kernels import mods

BATCH, LENGTH, HEADS, KV_HEADS, DIM = 2, 300, 4, 2, 16
BLOCKS = dict(block_q=64, block_k=128)
TOLERANCE = {jnp.float32: 2e-4, jnp.bfloat16: 4e-2}


# ---------------------------------------------------------------- NumPy, float64

def np_attention(q, k, v, cot, *, mod=None, visible=None, bias=None, scale=None):
  """Float64 softmax attention and its gradients, written out.

  Args:
    q: ``[B, T, H, D]``; k, v: ``[B, S, G, D]`` (G K/V heads, H a multiple).
    cot: the output's cotangent ``[B, T, H, D]``.
    mod: ``raw [B, H, T, S] -> (score, d score / d raw)``.
    visible: bool broadcastable to ``[B, H, T, S]``.

  Returns:
    ``out`` and ``{"q", "k", "v", "ds"}``: gradients of ``sum(out * cot)``
    (``ds`` wrt the modded score, for the mods' own parameters).
  """
  q, k, v, cot = (np.asarray(x).astype(np.float64) for x in (q, k, v, cot))
  b, t, h, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  rep = h // g
  k_full, v_full = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  scale = d ** -0.5 if scale is None else scale
  raw = np.einsum("bthd,bshd->bhts", q, k_full) * scale
  if bias is not None:
    raw = raw + bias
  hidden = np.isneginf(raw)
  safe_raw = np.where(hidden, 0.0, raw)
  score, d_mod = (safe_raw, np.ones_like(raw)) if mod is None else mod(safe_raw)
  ok = ~hidden
  if visible is not None:
    ok = ok & np.broadcast_to(visible, raw.shape)
  score = np.where(ok, score, -np.inf)
  row_max = score.max(-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(ok, np.exp(score - row_max), 0.0)
  total = e.sum(-1, keepdims=True)
  p = e / np.where(total > 0, total, 1.0)
  out = np.einsum("bhts,bshd->bthd", p, v_full)
  d_v = np.einsum("bhts,bthd->bshd", p, cot)
  d_p = np.einsum("bthd,bshd->bhts", cot, v_full)
  d_s = p * (d_p - (d_p * p).sum(-1, keepdims=True))
  d_raw = d_s * d_mod
  d_q = np.einsum("bhts,bshd->bthd", d_raw, k_full) * scale
  d_k = np.einsum("bhts,bthd->bshd", d_raw, q) * scale
  group = lambda x: x.reshape(b, s_len, g, rep, -1).sum(3)
  return out, {"q": d_q, "k": group(d_k), "v": group(d_v), "ds": d_s}


def _distance(t, s):
  """``j - i`` over ``[T, S]``."""
  return np.arange(s)[None, :] - np.arange(t)[:, None]


def np_alibi(slopes, t, s, symmetric=False):
  dist = _distance(t, s)
  dist = -np.abs(dist) if symmetric else dist
  slopes = np.asarray(slopes, np.float64)[None, :, None, None]
  return lambda raw: (raw + slopes * dist, np.ones_like(raw)), dist


def np_softcap(cap):
  return lambda raw: (cap * np.tanh(raw / cap), 1.0 - np.tanh(raw / cap) ** 2)


def np_relative_bias(table, max_distance, t, s):
  column = np.clip(_distance(t, s), -max_distance, max_distance) + max_distance
  table = np.asarray(table, np.float64)
  return lambda raw: (raw + table[:, column][None], np.ones_like(raw)), column


def np_table_grad(d_s, column, shape):
  """d table[h, c] = sum of dS over the (b, i, j) whose column is c."""
  grad = np.zeros(shape)
  for h in range(shape[0]):
    np.add.at(grad[h], column, d_s[:, h].sum(0))
  return grad


def _causal(t, s):
  return _distance(t, s) <= 0


def _close(got, want, tol, what):
  """Max error within ``tol`` of the larger of 1 and the largest wanted value."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = np.max(np.abs(got - want)) if want.size else 0.0
  bound = tol * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
  assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _inputs(seed, dtype=jnp.float32, batch=BATCH, length=LENGTH, heads=HEADS,
            kv_heads=KV_HEADS, dim=DIM):
  rng = np.random.default_rng(seed)
  make = lambda n: jnp.asarray(rng.normal(size=(batch, length, n, dim)), dtype)
  cot = jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
  return make(heads), make(kv_heads), make(kv_heads), cot


def _documents(seed, batch=BATCH, length=LENGTH, count=4):
  """int32 ``[batch, length]`` ids of ``count`` contiguous documents per row."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), count - 1, replace=False))
    ids[row] = np.searchsorted(cuts, np.arange(length), side="right")
  return ids


# ---------------------------------------------------------------- the mods, densely

def test_alibi_slopes_are_the_papers_geometric_sequence():
  np.testing.assert_array_equal(mods.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  # 6 heads: the 4-head sequence, then every other slope of the 8-head one.
  np.testing.assert_array_equal(mods.alibi_slopes(6),
                                [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
  assert mods.alibi_slopes(1).tolist() == [2 ** -8]


def _library_cases(t, s, batch):
  """name -> (score_mod, mask_mod, NumPy mod, NumPy visible)."""
  rng = np.random.default_rng(7)
  slopes = mods.alibi_slopes(HEADS)
  table = rng.normal(size=(HEADS, 2 * 5 + 1))
  ids = _documents(3, batch, t, count=3)
  kv_ids = _documents(4, batch, s, count=3)
  prefix = np.array([5, 0])[:batch]
  dist = _distance(t, s)
  return {
      "alibi": (mods.alibi(HEADS), None, np_alibi(slopes, t, s)[0], None),
      "alibi_symmetric": (mods.alibi(slopes, symmetric=True), None,
                          np_alibi(slopes, t, s, symmetric=True)[0], None),
      "softcap": (mods.softcap(2.0), None, np_softcap(2.0), None),
      "relative_bias": (mods.relative_bias(table, 5), None,
                        np_relative_bias(table, 5, t, s)[0], None),
      "causal": (None, mods.causal(), None, _causal(t, s)),
      "sliding_window": (None, mods.sliding_window((3, 1)), None, (dist >= -3) & (dist <= 1)),
      "prefix_lm": (None, mods.prefix_lm(4), None, (dist <= 0) | (np.arange(s) < 4)),
      "prefix_lm_per_row": (None, mods.prefix_lm(prefix), None,
                            (dist <= 0)[None, None] | (np.arange(s) < prefix[:, None, None, None])),
      "document": (None, mods.document(ids, kv_ids), None,
                   (ids[:, :, None] == kv_ids[:, None, :])[:, None]),
      "and_or_chain": (mods.chain(mods.alibi(HEADS), mods.softcap(3.0)),
                       mods.or_masks(mods.and_masks(mods.causal(), mods.sliding_window(2)),
                                     lambda b, h, q_idx, kv_idx: kv_idx == 0),   # a sink key
                       lambda raw: (lambda a: (3.0 * np.tanh(a / 3.0),
                                               1.0 - np.tanh(a / 3.0) ** 2))(
                                                   np_alibi(slopes, t, s)[0](raw)[0]),
                       ((dist <= 0) & (dist >= -2)) | (np.arange(s) == 0)),
  }


@pytest.mark.parametrize("name", sorted(_library_cases(9, 11, 2)))
def test_each_mod_in_reference_matches_float64_numpy(name):
  """The definition: reference in float64 (cross-attention, 9 queries x 11
  keys, grouped heads) against the formulas in the mods' docstrings."""
  t, s = 9, 11
  score_mod, mask_mod, np_mod, visible = _library_cases(t, s, BATCH)[name]
  rng = np.random.default_rng(1)
  q = rng.normal(size=(BATCH, t, HEADS, DIM))
  k, v = (rng.normal(size=(BATCH, s, KV_HEADS, DIM)) for _ in range(2))
  want, _ = np_attention(q, k, v, np.zeros_like(q), mod=np_mod, visible=visible)
  with jax.enable_x64(True):
    got = kernels.dot_product_attention(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)), implementation="reference",
        score_mod=score_mod, mask_mod=mask_mod)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_mods_registry_names_factories_and_kinds():
  assert mods.get("alibi") is mods.alibi and mods.kind("alibi") == "score_mod"
  assert mods.kind("document") == "mask_mod"
  assert {"alibi", "softcap", "relative_bias", "causal", "sliding_window", "prefix_lm",
          "document"} <= set(mods.names())
  with pytest.raises(ValueError, match=r"unknown attention mod 'alibj'.*alibi"):
    mods.get("alibj")
  mods.register("my_mask", lambda: (lambda b, h, q, kv: kv != 0), "mask_mod")
  assert mods.kind("my_mask") == "mask_mod"
  mods._MODS.pop("my_mask")
  with pytest.raises(ValueError, match="kind must be"):
    mods.register("bad", mods.causal, "score")
  # Hashable arguments give the same mod object: one block mask per shape.
  assert mods.causal() is mods.causal()
  assert mods.sliding_window([3, 1]) is mods.sliding_window((3, 1))
  first = masks.block_mask(mods.causal(), 1, 1, 100, 100, 32, 32)
  assert masks.block_mask(mods.causal(), 1, 1, 100, 100, 32, 32) is first


# ---------------------------------------------------------------- blockwise, across blocks

def _case(name, t=LENGTH, s=LENGTH):
  """name -> (build(params, ids) -> (score_mod, mask_mod, bias), params, NumPy side).

  The NumPy side: ``(mod, visible, bias, param_grads(ds) -> dict)``.
  """
  rng = np.random.default_rng(11)
  ids = _documents(5)
  if name == "alibi_learned_causal":
    # Learned slopes; causal mask_mod with a static block mask (upper blocks skipped).
    slopes = mods.alibi_slopes(HEADS) * rng.uniform(0.5, 2.0, HEADS).astype(np.float32)
    np_mod, dist = np_alibi(slopes, t, s)
    build = lambda p, ids: (mods.alibi(p["slopes"]), mods.causal(), None)
    grads = lambda d_s: {"slopes": (d_s * dist).sum(axis=(0, 2, 3))}
    return build, {"slopes": jnp.asarray(slopes)}, (np_mod, _causal(t, s), None, grads)
  if name == "bias_table_traced_documents":
    # A learned relative-bias table; document ids traced inside jit, so the
    # mask_mod is evaluated in every block (no static block mask).
    table = rng.normal(size=(HEADS, 2 * 8 + 1)).astype(np.float32)
    np_mod, column = np_relative_bias(table, 8, t, s)
    build = lambda p, ids: (mods.relative_bias(p["table"], 8), mods.document(ids), None)
    grads = lambda d_s: {"table": np_table_grad(d_s, column, table.shape)}
    return build, {"table": jnp.asarray(table)}, (
        np_mod, (ids[:, :, None] == ids[:, None, :])[:, None], None, grads)
  if name == "softcap_fixed_alibi_prefix_window_neg_inf_bias":
    # A score_mod closing over a NumPy constant, a static mask_mod, and a
    # bias whose -inf keys must stay hidden through the soft cap.
    slopes = mods.alibi_slopes(HEADS)
    np_alibi_mod = np_alibi(slopes, t, s)[0]

    def np_mod(raw):
      a = np_alibi_mod(raw)[0]
      return 4.0 * np.tanh(a / 4.0), 1.0 - np.tanh(a / 4.0) ** 2

    bias = rng.normal(size=(1, 1, 1, s)).astype(np.float32)
    bias[..., [3, 140, 299]] = -np.inf
    dist = _distance(t, s)
    visible = ((dist <= 0) | (np.arange(s) < 50)) & (dist >= -100)
    build = lambda p, ids: (mods.chain(mods.alibi(slopes), mods.softcap(4.0)),
                            mods.and_masks(mods.prefix_lm(50), mods.sliding_window((100, s))),
                            jnp.asarray(bias))
    return build, {}, (np_mod, visible, bias.astype(np.float64), lambda d_s: {})
  if name == "atan_distance_learned":
    # Elementwise, but through an operation (atan) that mods.hoist_keys_major
    # does not vouch for: the backward keeps its blocks query-major.
    weights = rng.uniform(0.5, 2.0, HEADS).astype(np.float32)
    curve = np.arctan(_distance(t, s) / 8.0)
    np_mod = lambda raw: (raw + np.asarray(weights, np.float64)[None, :, None, None] * curve,
                          np.ones_like(raw))
    build = lambda p, ids: (_atan_distance(p["w"]), mods.causal(), None)
    grads = lambda d_s: {"w": (d_s * curve).sum(axis=(0, 2, 3))}
    return build, {"w": jnp.asarray(weights)}, (np_mod, _causal(t, s), None, grads)
  raise KeyError(name)


def _atan_distance(weights):
  return lambda score, b, h, q_idx, kv_idx: score + weights[h] * jnp.arctan((kv_idx - q_idx) / 8.0)


def test_score_mods_run_in_the_backwards_layout_when_free_of_the_axis_order():
  """blockwise's backward keeps its blocks keys-major and evaluates a mod
  there when its operations cannot depend on the axis order; the rest run
  query-major (both layouts checked against float64 above)."""
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  args = (jax.ShapeDtypeStruct((2, HEADS, 16, 8), jnp.float32), spec(2, 1, 1, 1),
          spec(1, HEADS, 1, 1), spec(1, 1, 16, 1), spec(1, 1, 1, 8))
  free = {"alibi": mods.alibi(HEADS), "softcap": mods.softcap(4.0),
          "relative_bias": mods.relative_bias(jnp.ones((HEADS, 17)), 8),
          "t5": mods.t5_relative_bias(jnp.ones((HEADS, 32)))}
  tied = {"atan": _atan_distance(jnp.ones(HEADS)),
          "row_sum": lambda s, *i: s - s.sum(-1, keepdims=True),
          "reversed": lambda s, *i: s + s[..., ::-1]}
  for name, mod in {**free, **tied}.items():
    _, consts = mods.hoist(mod, *args)
    assert (mods.hoist_keys_major(mod, consts, *args) is not None) == (name in free), name


@pytest.mark.parametrize("name, dtype", [
    ("alibi_learned_causal", jnp.float32),
    ("alibi_learned_causal", jnp.bfloat16),
    ("bias_table_traced_documents", jnp.float32),
    ("softcap_fixed_alibi_prefix_window_neg_inf_bias", jnp.float32),
    ("atan_distance_learned", jnp.float32),
], ids=["alibi_causal-f32", "alibi_causal-bf16", "table_documents-f32", "softcap_prefix-f32",
        "atan_query_major-f32"])
def test_blockwise_mods_forward_and_gradients_match_float64(name, dtype):
  build, params, (np_mod, visible, bias, np_param_grads) = _case(name)
  q, k, v, cot = _inputs(0, dtype)
  ids = jnp.asarray(_documents(5))

  def loss(q, k, v, params, ids):
    score_mod, mask_mod, bias = build(params, ids)
    out = kernels.dot_product_attention(q, k, v, bias, implementation="blockwise",
                                        score_mod=score_mod, mask_mod=mask_mod, **BLOCKS)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      q, k, v, params, ids)
  want, want_grads = np_attention(q, k, v, cot, mod=np_mod, visible=visible, bias=bias)
  tol = TOLERANCE[dtype]
  assert out.dtype == dtype
  _close(out, want, tol, f"{name} out")
  for what, got in zip("qkv", grads[:3]):
    assert got.dtype == dtype
    _close(got, want_grads[what], tol, f"{name} d{what}")
  want_params = np_param_grads(want_grads["ds"])
  assert set(grads[3]) == set(want_params)
  for what, got in grads[3].items():
    _close(got, want_params[what], tol, f"{name} d{what}")


def test_block_sparse_skipping_equals_no_skipping_and_a_dense_mask():
  """Documents as a static block mask (NumPy ids: empty blocks skipped, full
  blocks unmasked), as traced ids (every block evaluated) and as a dense
  boolean ``mask``: the same outputs and gradients."""
  q, k, v, cot = _inputs(2, heads=2, kv_heads=2, dim=8)
  ids = _documents(6, count=5)
  blocks = dict(block_q=32, block_k=32)
  table = masks.block_mask(mods.document(ids), BATCH, 2, LENGTH, LENGTH, 32, 32)
  assert table is not None and table.sparsity > 0.3
  assert (table.state == masks.FULL).any() and (table.state == masks.PARTIAL).any()

  def run(q, k, v, traced_ids, how):
    if how == "static":          # NumPy ids: concrete at trace time
      extra = dict(mask_mod=mods.document(ids), **blocks)
    elif how == "traced":
      extra = dict(mask_mod=mods.document(traced_ids), **blocks)
    else:
      extra = dict(mask=(traced_ids[:, :, None] == traced_ids[:, None, :])[:, None], **blocks)
    out = kernels.dot_product_attention(q, k, v, implementation="blockwise", **extra)
    return jnp.sum(out * cot), out

  results = {}
  for how in ("static", "traced", "dense"):
    fn = jax.jit(jax.value_and_grad(lambda q, k, v, ids, how=how: run(q, k, v, ids, how),
                                    argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(q, k, v, jnp.asarray(ids))
    results[how] = (out,) + tuple(grads)
  same_document = (ids[:, :, None] == ids[:, None, :])[:, None]
  want, want_grads = np_attention(q, k, v, cot, visible=same_document)
  _close(results["static"][0], want, 2e-4, "static out")
  for what, got in zip("qkv", results["static"][1:]):
    _close(got, want_grads[what], 2e-4, f"static d{what}")
  for how in ("traced", "dense"):
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["static"], results[how]):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=f"{how} {name}")


def test_mask_mod_hiding_whole_rows_gives_zeros_and_finite_gradients():
  """Queries 0..69 see no key (the first query blocks are empty blocks in the
  static case), under blockwise (static and traced threshold) and reference."""
  q, k, v, cot = _inputs(3, length=150, heads=2, kv_heads=1, dim=8)
  want, want_grads = np_attention(q, k, v, cot, visible=(np.arange(150) >= 70)[:, None])
  cases = {
      "blockwise static": (dict(implementation="blockwise", block_q=32, block_k=32),
                           lambda first: (lambda b, h, qi, ki: qi >= 70)),
      "blockwise traced": (dict(implementation="blockwise", block_q=32, block_k=32),
                           lambda first: (lambda b, h, qi, ki: qi >= first)),
      "reference": (dict(implementation="reference"),
                    lambda first: (lambda b, h, qi, ki: qi >= first)),
  }
  table = masks.block_mask(cases["blockwise static"][1](None), 1, 2, 150, 150, 32, 32)
  assert (table.state[:2] == masks.EMPTY).all() and table.kv_count[0] == 0

  for name, (kw, make) in cases.items():
    def loss(q, k, v, first):
      out = kernels.dot_product_attention(q, k, v, mask_mod=make(first), **kw)
      return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v, jnp.int32(70))
    assert np.all(np.asarray(out)[:, :70] == 0.0), name
    _close(out, want, 2e-4, name)
    for what, got in zip("qkv", grads):
      _close(got, want_grads[what], 2e-4, f"{name} d{what}")


def test_automatic_dispatch_and_kernels_without_the_feature(caplog):
  q, k, v, _ = _inputs(4, length=16, heads=2, kv_heads=2, dim=8)
  alibi, causal = mods.alibi(2), mods.causal()
  with pytest.raises(ValueError, match=r"'jax_nn' does not support 'score_mod'"):
    kernels.dot_product_attention(q, k, v, implementation="jax_nn", score_mod=alibi)
  with pytest.raises(ValueError, match=r"'jax_nn' does not support 'mask_mod'"):
    kernels.dot_product_attention(q, k, v, implementation="jax_nn", mask_mod=causal)
  features = kernels.requested_features(score_mod=alibi, mask_mod=causal)
  assert features == {"score_mod", "mask_mod"}
  long = kernels.checks.AttentionShape((1,), 4096, 4096, 8, 8, 64, 64)
  select = lambda platform, dtype: kernels.select(features, platform, dtype, long,
                                                  mask_mod=causal, score_mod=alibi).name
  assert select("cpu", "float32") == "blockwise"
  # The Pallas kernel runs both hooks fused on the accelerators (splash has
  # no score_mod); tests/test_pallas_mods.py checks it.
  assert select("gpu", "float32") == "pallas"
  assert select("tpu", "bfloat16") == "pallas"
  # Short sequences on CPU: blockwise's cut-over yields to jax_nn, which lacks
  # the hooks, so blockwise runs them (not the float32, materialised
  # reference, which would also undo a bfloat16 model's precision); without
  # hooks jax_nn runs. The log says why the others did not.
  kernels.dispatch._LOGGED_CHOICES.clear()
  with caplog.at_level(logging.INFO, logger="absl"):
    out = kernels.dot_product_attention(q, k, v, score_mod=alibi, mask_mod=causal)
  chosen = [r.getMessage() for r in caplog.records
            if "attention kernel on cpu for ['mask_mod', 'score_mod']" in r.getMessage()]
  assert chosen and chosen[0].split(": ")[1].startswith("blockwise"), chosen
  short = kernels.checks.AttentionShape((1,), 16, 16, 2, 2, 8, 8)
  assert kernels.select(frozenset({"causal"}), "cpu", "float32", short).name == "jax_nn"
  assert kernels.select(frozenset({"causal"}), "cpu", "float32", long).name == "blockwise"
  want, _ = np_attention(q, k, v, np.zeros(q.shape), mod=np_alibi(mods.alibi_slopes(2), 16, 16)[0],
                         visible=_causal(16, 16))
  _close(out, want, 2e-5, "automatic")


def test_t5_buckets_match_values_worked_by_hand():
  """32 buckets, max distance 128. Bidirectional: 16 per direction, 8 exact
  (0..7), then 8 + floor(8 log(n/8) / log(16)): n=9 -> 8 + floor(0.34) = 8,
  n=15 -> 8 + floor(1.81) = 9, n=16 -> 10, n=127 -> 8 + floor(7.98) = 15, and
  15 beyond; keys after the query add 16. Causal: 16 exact, then
  16 + floor(16 log(n/16) / log(8)): n=127 -> 16 + floor(15.94) = 31; later
  keys all 0."""
  relative = np.array([0, -1, -7, -8, -9, -15, -16, -127, -1000, 1, 7, 8, 100])
  both = [0, 1, 7, 8, 8, 9, 10, 15, 15, 17, 23, 24, 31]
  np.testing.assert_array_equal(mods.t5_bucket(relative), both)
  causal = [0, 1, 7, 8, 9, 15, 16, 31, 31, 0, 0, 0, 0]
  np.testing.assert_array_equal(mods.t5_bucket(relative, bidirectional=False), causal)
  table = np.arange(64, dtype=np.float32).reshape(2, 32)
  score = mods.t5_relative_bias(table)(jnp.zeros((1, 2, 1, 3)), None,
                                       jnp.arange(2).reshape(1, 2, 1, 1),
                                       jnp.full((1, 1, 1, 1), 9), jnp.asarray([[[[0, 9, 18]]]]))
  np.testing.assert_array_equal(score[0, :, 0], [[8, 0, 24], [40, 32, 56]])   # n = 9, 0, -9
