"""The blockwise kernel's own options: block sizes, block skipping, lengths, memory.

(Its agreement with the float64 reference across masks, bias, causal, windows,
dtypes and fully masked rows is in test_kernels.py, with every kernel.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import blockwise
from attention_lab.kernels import masks
from attention_lab.kernels import mods
from attention_lab.kernels.blockwise import blockwise_attention


def _inputs(seed, q_len, kv_len, batch=2, heads=2, dim=8):
  rng = np.random.default_rng(seed)
  make = lambda length: jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
  return make(q_len), make(kv_len), make(kv_len)


def _check(q, k, v, tol=2e-5, **kw):
  ref_kw = {a: b for a, b in kw.items() if a not in ("block_q", "block_k")}
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape[:-1] + (v.shape[-1],)), jnp.float32)
  f = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, **kw) * cot)
  g = lambda q, k, v: jnp.sum(kernels.reference_attention(q, k, v, **ref_kw) * cot)
  np.testing.assert_allclose(blockwise_attention(q, k, v, **kw),
                             kernels.reference_attention(q, k, v, **ref_kw), rtol=tol, atol=tol)
  for a, b in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("q_len, kv_len, block_q, block_k", [
    (70, 70, 16, 8), (70, 70, 8, 32), (20, 50, 8, 8), (50, 20, 16, 8), (1, 33, 8, 8)])
@pytest.mark.parametrize("form", ["full", "causal", "window", "causal_window"])
def test_block_sizes_and_skipping(q_len, kv_len, block_q, block_k, form):
  """Small blocks over odd lengths: many padded and skipped blocks."""
  q, k, v = _inputs(0, q_len, kv_len)
  kw = {"full": {}, "causal": {"is_causal": True}, "window": {"local_window_size": (5, 3)},
        "causal_window": {"is_causal": True, "local_window_size": (9, 0)}}[form]
  _check(q, k, v, block_q=block_q, block_k=block_k, **kw)


@pytest.mark.parametrize("q_len, kv_len, block_q, block_k", [
    (70, 70, 16, 8), (70, 70, 8, 32), (20, 50, 8, 8), (50, 20, 16, 8), (64, 64, 16, 16)])
@pytest.mark.parametrize("causal, window", [
    (True, None), (False, (5, 3)), (True, (9, 0)), (False, (0, 12)), (True, (40, 40)),
    (False, (7, 7))])
def test_band_block_mask_matches_every_pair(q_len, kv_len, block_q, block_k, causal, window):
  """Causal and windowed attention's block mask, computed from block corners,
  against the visible pairs counted one by one (padded keys hidden)."""
  table = masks.band_block_mask(q_len, kv_len, block_q, block_k, is_causal=causal,
                                window=window)
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  want = np.zeros((nq, nk), np.int8)
  for qi in range(nq):
    for kj in range(nk):
      pairs = [(q, k) for q in range(qi * block_q, min((qi + 1) * block_q, q_len))
               for k in range(kj * block_k, (kj + 1) * block_k)]
      seen = [k < kv_len and (not causal or k <= q)
              and (window is None or q - window[0] <= k <= q + window[1]) for q, k in pairs]
      want[qi, kj] = masks.FULL if all(seen) else masks.PARTIAL if any(seen) else masks.EMPTY
  np.testing.assert_array_equal(table.state, want)
  assert (table.state == masks.EMPTY).any()             # the shapes do skip blocks
  loose = masks.band_block_mask(q_len, kv_len, block_q, block_k, is_causal=causal,
                                window=window, exact=False)
  np.testing.assert_array_equal(loose.state, np.minimum(want, masks.PARTIAL))


def test_length_options_equal_a_dense_padding_mask():
  q, k, v = _inputs(2, 37, 53)
  q_lengths, kv_lengths = jnp.array([37, 10]), jnp.array([20, 0])
  dense = masks.attention_mask(masks.padding_mask(q_lengths, 37), masks.padding_mask(kv_lengths, 53))
  got = blockwise_attention(q, k, v, q_lengths=q_lengths, kv_lengths=kv_lengths, block_q=16, block_k=16)
  want = kernels.reference_attention(q, k, v, mask=dense)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert np.all(np.asarray(got[1]) == 0.0)       # no valid key in batch element 1
  via_registry = kernels.dot_product_attention(q, k, v, implementation="blockwise",
                                               kv_lengths=kv_lengths, q_lengths=q_lengths)
  np.testing.assert_allclose(via_registry, want, rtol=2e-5, atol=2e-5)


def test_bad_options():
  q, k, v = _inputs(3, 8, 8)
  with pytest.raises(ValueError, match=r"kv_lengths shape \(3,\) must equal the batch shape \(2,\)"):
    blockwise_attention(q, k, v, kv_lengths=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="block sizes must be positive"):
    blockwise_attention(q, k, v, block_q=0)
  with pytest.raises(ValueError, match=r"'jax_nn' does not take option\(s\) \['block_q'\]"):
    kernels.dot_product_attention(q, k, v, implementation="jax_nn", block_q=4)
  # Lengths reach every kernel: natively, or as a padding mask.
  lengths = jnp.array([1, 5])
  np.testing.assert_allclose(
      kernels.dot_product_attention(q, k, v, implementation="jax_nn", kv_lengths=lengths),
      blockwise_attention(q, k, v, kv_lengths=lengths), atol=1e-5)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


# Call forms for the memory test: ``(length -> array keywords, static keywords)``.
# The mask is dense ([q, kv], a quadratic input, but read in blocks, never
# copied); the bias is per key ([kv]): a dense [q, kv] float bias is an input of
# the score matrix's own size, and the backward pass also carries a float32
# gradient buffer of the bias's shape (XLA keeps a loop carry even when nobody
# asks for that gradient), so its scratch grows with the bias, not the kernel.
MEMORY_FORMS = {
    "mask": (lambda n: {"mask": jnp.asarray(np.random.default_rng(0).random((1, 1, n, n)) < 0.9)},
             {}),
    "bias": (lambda n: {"bias": jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 1, n)),
                                            jnp.float32)}, {}),
    "kv_lengths": (lambda n: {"kv_lengths": jnp.array([n - n // 3])}, {}),
    "causal": (lambda n: {}, {"is_causal": True}),
}


@pytest.mark.parametrize("form", sorted(MEMORY_FORMS))
def test_memory_grows_linearly_with_length(form):
  """XLA's own accounting of scratch memory: the score matrix never exists.

  At 4,096 tokens one float32 score matrix of one head is 64 MiB; the
  blockwise kernel's forward+backward scratch stays a few MiB and at most
  doubles when the length doubles. Measured (jax 0.10, CPU, one head of 64):
  2,048 -> 4,096 tokens, 5.1 -> 6.2 MiB (1.20x) with the mask, the per-key
  bias or kv_lengths, 3.1 -> 4.2 MiB (1.32x) causal. Linear growth allows 2x;
  the bound 2.2x leaves 10% for XLA's buffer assignment, and an extra
  ``[length, length]`` buffer of even one byte per entry breaks it (it adds
  4 MiB at 2,048 and 16 MiB at 4,096: 2.4x). The reference's scratch grows
  past 256 MiB.
  """
  make_arrays, static = MEMORY_FORMS[form]

  def grad_fn(q, k, v, arrays):
    loss = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, **arrays, **static))
    return jax.grad(loss, (0, 1, 2))(q, k, v)

  temps = {}
  for length in (2048, 4096):
    x = jnp.zeros((1, length, 1, 64), jnp.float32)
    temps[length] = _temp_bytes(grad_fn, x, x, x, make_arrays(length))
  score_matrix = 4096 * 4096 * 4
  assert temps[4096] < score_matrix / 4, temps
  assert temps[4096] <= 2.2 * temps[2048], temps
  if form == "causal":
    dense = jnp.zeros((1, 4096, 1, 64), jnp.float32)
    reference_temp = _temp_bytes(
        lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(
            kernels.reference_attention(q, k, v, is_causal=True) ** 2), (0, 1, 2))(q, k, v),
        dense, dense, dense)
    assert reference_temp >= score_matrix        # the materialising kernel, for contrast


def test_many_sequences_run_in_passes_and_match_float64(monkeypatch):
  """With more score bytes per block than ``PASS_BYTES`` the batch rows go
  through the block loops in passes (a lax.map); a bias per row is split
  with them, one shared by every row is passed whole, lengths split too.
  Output and every gradient (bias included) against a float64 softmax
  written out here."""
  from attention_lab.kernels import blockwise
  batch, length, heads, dim = 6, 70, 2, 8
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
             for _ in range(3))
  lengths = jnp.asarray([70, 41, 3, 70, 1, 64])
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  # 2 rows per pass: 2 rows x 2 heads x 16 x 32 float32 scores per block.
  monkeypatch.setattr(blockwise, "PASS_BYTES", 2 * heads * 16 * 32 * 4)
  assert blockwise._rows_per_pass(batch, heads, 16, 32) == 2

  def dense64(q, k, v, bias):
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim) + bias
    keep = (np.arange(length)[None, :] <= np.arange(length)[:, None])[None, None]
    keep = keep & (np.arange(length)[None, None, None, :] < np.asarray(lengths)[:, None, None, None])
    s = np.where(keep, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)

  for bias_shape in [(batch, heads, length, length), (1, heads, length, length)]:
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    f = lambda q, k, v, b: blockwise_attention(q, k, v, b, kv_lengths=lengths, is_causal=True,
                                               block_q=16, block_k=32)
    jaxpr = str(jax.make_jaxpr(f)(q, k, v, bias))
    assert "3,2,2,80,8" in jaxpr.replace(" ", "")    # [3 passes, 2 rows, heads, T padded, d]
    got = f(q, k, v, bias)
    np.testing.assert_allclose(got, dense64(*(np.float64(x) for x in (q, k, v, bias))),
                               atol=2e-5)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2, 3))(q, k, v, bias)
    # Gradients of the float64 definition by central differences would be
    # slow; jax's autodiff of the same NumPy-free formula in float64 is the
    # independent reference here (no blockwise code in it).
    with jax.enable_x64(True):
      def dense_jax(q, k, v, b):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim) + b
        keep = (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None])[None, None]
        keep = keep & (jnp.arange(length)[None, None, None, :] < lengths[:, None, None, None])
        w = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v)
      as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
      want = jax.grad(lambda *a: jnp.sum(dense_jax(*a) * as64(cot)), (0, 1, 2, 3))(
          as64(q), as64(k), as64(v), as64(bias))
    for name, g, w in zip(["q", "k", "v", "bias"], grads, want):
      assert g.shape == w.shape, name
      np.testing.assert_allclose(g, w, atol=1e-4, err_msg=name)


# ---------------------------------------------------------------- blocks placed on a finer grain

def _visit_counts(visits, outer, block, padded):
  """Per outer block, how many visits of ``visits`` (a ``masks.Visits``)
  count each (outer, inner) pair: ``[outer blocks, outer block, padded]`` int.
  Also checks each visit's length (``block``, or a trimmed multiple of the
  grain below it) and that ``ranges`` sorts them by length, full ones first."""
  counts = np.zeros((len(visits.count), outer, padded), np.int32)
  for o, n in enumerate(visits.count):
    for start, low, size in zip(visits.starts[o, :n], visits.lows[o, :n], visits.sizes[o, :n]):
      assert 0 <= start <= low < start + size <= padded and size <= block
      counts[o, :, low:start + size] += 1
    assert (visits.sizes[o, n:] == 0).all()
    for g, size in enumerate(visits.groups):
      begin, mid, end = visits.ranges[o, g]
      assert (visits.sizes[o, begin:end] == size).all()
    assert visits.ranges[o, -1, 2] == n
    assert (visits.ranges[o, :, 1] - visits.ranges[o, :, 0]).sum() == visits.full[o]
  return counts


@pytest.mark.parametrize("pattern", ["documents", "window", "causal_window", "two_spans", "random"])
@pytest.mark.parametrize("q_len, kv_len, block_q, block_k, grain", [
    (150, 150, 32, 32, 8), (100, 130, 16, 64, 16), (128, 128, 32, 64, 8)])
def test_place_visits_counts_every_visible_pair_once(pattern, q_len, kv_len, block_q, block_k,
                                                    grain):
  """Blocks placed on a finer grain, against the visible pairs written out in
  NumPy: every visible pair counted by exactly one visit of its block, a full
  visit only where every pair is visible, never more visits than aligned
  blocks need, fewer for bands and documents."""
  rng = np.random.default_rng(q_len + kv_len)
  qi, ki = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  ids_q = np.sort(rng.integers(0, 5, q_len))
  ids_k = np.sort(rng.integers(0, 5, kv_len))
  visible = {
      "documents": ids_q[:, None] == ids_k[None, :],
      "window": (ki >= qi - 11) & (ki <= qi + 6),
      "causal_window": (ki <= qi) & (ki >= qi - 20),
      # Keys of two spans far apart: the second visit is shifted back over
      # the first to end inside the padded length.
      "two_spans": ((ki >= 9) & (ki < 14)) | (ki >= kv_len - 5) & (qi >= 0),
      "random": np.repeat(np.repeat(rng.random((q_len // 8 + 1, kv_len // 8 + 1)) < 0.2, 8, 0),
                          8, 1)[:q_len, :kv_len],
  }[pattern]
  mod = lambda b, h, q, k: jnp.asarray(visible)[q, k]
  fine = masks.block_mask(mod, 1, 1, q_len, kv_len, grain, grain)
  q_pad, kv_pad = -(-q_len // block_q) * block_q, -(-kv_len // block_k) * block_k
  fwd = masks.place_visits(fine.state, block_q // grain, q_pad // block_q, block_k, grain, kv_pad)
  bwd = masks.place_visits(fine.state.T, block_k // grain, kv_pad // block_k, block_q, grain,
                           q_pad)
  trimmed = masks.place_visits(fine.state, block_q // grain, q_pad // block_q, block_k, grain,
                               kv_pad, trim=True)
  assert fwd.groups == (block_k,) and bwd.groups == (block_q,)     # whole blocks
  assert not trimmed.shifted and (trimmed.sizes % grain == 0).all()
  for visits, seen, outer, block, padded in [
      (fwd, visible, block_q, block_k, kv_pad), (bwd, visible.T, block_k, block_q, q_pad),
      (trimmed, visible, block_q, block_k, kv_pad)]:
    counts = _visit_counts(visits, outer, block, padded)
    padded_seen = np.zeros((len(visits.count) * outer, padded), bool)
    padded_seen[:seen.shape[0], :seen.shape[1]] = seen
    per_block = padded_seen.reshape(len(visits.count), outer, padded)
    assert (counts[per_block] == 1).all()                  # each visible pair once
    assert (counts <= 1).all()                             # no pair counted twice
    real = np.arange(len(visits.count) * outer).reshape(-1, outer) < seen.shape[0]
    for o in range(len(visits.count)):
      for g, size in enumerate(visits.groups):           # full visits: nothing to hide
        begin, mid, _ = visits.ranges[o, g]
        for start in visits.starts[o, begin:mid]:
          assert per_block[o][real[o]][:, start:start + size].all()
    aligned = masks.block_mask(mod, 1, 1, q_len, kv_len, block_q, block_k)
    aligned_count = aligned.q_count if visits is bwd else aligned.kv_count
    assert visits.visited <= int(aligned_count.sum())
  # Trimming keeps the visits where they start and only ends them earlier:
  # never more keys than whole blocks, fewer wherever a visit's needed keys
  # end inside it (documents, bands, random spans at these sizes).
  assert trimmed.visited == fwd.visited
  assert trimmed.sizes.sum() <= fwd.visited * block_k
  if pattern != "two_spans":
    assert trimmed.sizes.sum() < fwd.visited * block_k and len(trimmed.groups) > 1
  if pattern in ("window", "causal_window") and block_k == 64:    # a band narrower than a block
    assert fwd.visited < int(aligned.kv_count.sum())
  if pattern == "two_spans" and kv_len == 128:
    assert fwd.shifted and bwd.visited == fwd.visited


def test_trimming_keeps_whole_blocks_where_loops_are_static_or_lengths_many():
  """Trimmed visits wherever they save keys (``blockwise._trim_pays``),
  except when whole blocks give every query block the same trip counts (XLA
  folds those into static loops: causal over one key block, a sliding
  window) or trimming would need more than ``TRIM_LENGTHS`` visit lengths
  (many short documents, a grain of 8 in blocks of 128 keys)."""
  def visits(q_len, kv_len, bq, bk, **band):
    table = masks.band_block_mask(q_len, kv_len, 128, 128, **band)
    return blockwise._visits(table.state, bq, bk, 128, 128, q_len, kv_len)

  one_key_block = visits(512, 512, 256, 512, is_causal=True)
  assert one_key_block["fwd"] is one_key_block["kv"]
  window = visits(4096, 4096, 256, 512, is_causal=True, window=(256, 0))
  assert window["fwd"] is window["kv"]
  causal = visits(1024, 1024, 256, 512, is_causal=True)
  assert causal["fwd"] is not causal["kv"] and causal["fwd"].groups == (512, 256)
  assert causal["fwd"].sizes.sum() == 2560 < 512 * causal["kv"].visited
  long_causal = visits(8192, 8192, 256, 512, is_causal=True)     # 3% of the keys saved
  assert long_causal["fwd"] is not long_causal["kv"]

  cuts = np.sort(np.random.default_rng(3).choice(np.arange(1, 1024), 11, replace=False))
  ids = np.searchsorted(cuts, np.arange(1024), side="right")      # 12 documents
  table = masks.block_mask(mods.document(ids[None]), 1, 1, 1024, 1024, 8, 8)
  many = blockwise._visits(table.state, 32, 128, 8, 8, 1024, 1024)
  trimmed = masks.place_visits(table.state, 4, 32, 128, 8, 1024, trim=True)
  assert len(trimmed.groups) > blockwise.TRIM_LENGTHS
  assert trimmed.sizes.sum() < many["kv"].sizes.sum() and many["fwd"] is many["kv"]


def _attention64(q, k, v, visible, cot, bias=None):
  """Float64 NumPy attention under ``visible`` (broadcast to ``[b, h, Tq,
  Tk]``; ``[b, t, h, d]`` inputs, default scale, plus a ``bias [b, h, Tq,
  Tk]``): the output and the gradients of ``sum(out * cot)`` wrt q, k, v
  (and the bias), the softmax backward written out (rows without a visible
  key give zeros)."""
  q, k, v, cot = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, cot))
  scale = q.shape[-1] ** -0.5
  s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  s = np.where(visible, s, -np.inf)
  top = s.max(-1, keepdims=True)
  e = np.where(visible, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  p = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
  out = np.einsum("bhqk,bhkd->bhqd", p, v)
  d_v = np.einsum("bhqk,bhqd->bhkd", p, cot)
  d_p = np.einsum("bhqd,bhkd->bhqk", cot, v)
  d_s = p * (d_p - (d_p * p).sum(-1, keepdims=True))
  d_q = np.einsum("bhqk,bhkd->bhqd", d_s, k) * scale
  d_k = np.einsum("bhqk,bhqd->bhkd", d_s, q) * scale
  back = lambda x: x.transpose(0, 2, 1, 3)
  grads = (back(d_q), back(d_k), back(d_v)) + ((d_s,) if bias is not None else ())
  return back(out), grads


@pytest.mark.parametrize("form", ["documents", "causal_window", "window", "two_spans",
                                  "two_query_spans", "traced_documents_causal"])
def test_placed_blocks_match_float64(monkeypatch, form):
  """blockwise with key and query blocks placed on a grain of 8 (blocks of
  32 and 64) against float64 NumPy, forward and gradients: documents and
  bands (the backward walks queries outer: fewer visits), two far spans of
  keys, then of queries (a visit shifted back over the one before, its
  overlap masked, in the forward, then in the backward walking keys outer)
  and traced document ids under causal (the band on a grain, every visit
  masked). Visits are trimmed, except for the two key spans: a trimmed
  visit is never shifted, so they run on whole blocks."""
  monkeypatch.setattr(blockwise, "GRAIN", 8)
  monkeypatch.setattr(blockwise, "_trim_pays", lambda *_: form != "two_spans")
  q_len = kv_len = 128
  q, k, v = _inputs(5, q_len, kv_len, batch=1)
  cot = np.random.default_rng(6).normal(size=q.shape)
  qi, ki = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  ids = np.sort(np.random.default_rng(7).integers(0, 6, kv_len)).astype(np.int32)
  same_doc = ids[:, None] == ids[None, :]
  kw = {"block_q": 32, "block_k": 64}
  # Spans whose second visit's overlap with the first holds visible pairs:
  # counted twice unless the overlap is masked.
  spans = ((ki >= 9) & (ki < 70)) | (ki >= kv_len - 5)
  query_spans = (((qi >= 72) & (qi < 100)) | (qi >= q_len - 5)) & (ki >= 0)
  call, visible = {
      "documents": (lambda q, k, v: blockwise_attention(
          q, k, v, mask_mod=mods.document(ids[None]), **kw), same_doc),
      "causal_window": (lambda q, k, v: blockwise_attention(
          q, k, v, is_causal=True, local_window_size=(21, 0), **kw),
          (ki <= qi) & (ki >= qi - 21)),
      "window": (lambda q, k, v: blockwise_attention(
          q, k, v, local_window_size=(5, 9), **kw), (ki >= qi - 5) & (ki <= qi + 9)),
      "two_spans": (lambda q, k, v: blockwise_attention(
          q, k, v, mask_mod=lambda b, h, qq, kk: ((kk >= 9) & (kk < 70)) | (kk >= kv_len - 5),
          **kw), spans & (qi >= 0)),
      "two_query_spans": (lambda q, k, v: blockwise_attention(
          q, k, v, mask_mod=lambda b, h, qq, kk: ((qq >= 72) & (qq < 100)) | (qq >= q_len - 5),
          **kw), query_spans),
      "traced_documents_causal": (lambda q, k, v: jax.jit(
          lambda q, k, v, t: blockwise_attention(q, k, v, is_causal=True,
                                                 mask_mod=mods.document(t), **kw))(
              q, k, v, jnp.asarray(ids[None])), same_doc & (ki <= qi)),
  }[form]
  assert blockwise._grain(64) == 8
  # Which walk and which shifted visit each form exercises.
  pattern = {"two_spans": spans & (qi >= 0), "two_query_spans": query_spans,
             "documents": same_doc, "window": visible}.get(form)
  if pattern is not None:
    table = masks.block_mask(lambda b, h, qq, kk: jnp.asarray(pattern)[qq, kk], 1, 2, q_len,
                             kv_len, 8, 8)
    visits = blockwise._visits(table.state, 32, 64, 8, 8, q_len, kv_len)
    queries_outer = blockwise._queries_outer(visits, 64)
    assert {"two_spans": visits["kv"].shifted and not queries_outer,
            "two_query_spans": visits["q"].shifted and not queries_outer,
            "documents": queries_outer, "window": queries_outer}[form]
    # The forward's visits trimmed (several lengths, one loop each), and
    # the backward's when it walks queries outer.
    assert (len(visits["fwd"].groups) > 1) == (form in ("documents", "window"))
  want, want_grads = _attention64(q, k, v, visible, cot)
  np.testing.assert_allclose(call(q, k, v), want, rtol=2e-5, atol=2e-5)
  grads = jax.grad(lambda q, k, v: jnp.sum(call(q, k, v) * cot), (0, 1, 2))(q, k, v)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_queries_outer_backward_with_bias_score_mod_and_grouped_heads(monkeypatch):
  """The backward walking queries outer (a window narrower than a key block)
  with everything it accumulates in place: a dense bias's gradient, a learned
  ALiBi slope's gradient, and grouped K/V heads (one K/V head for two query
  heads), against float64 NumPy with the ALiBi term, the bias and the head
  groups written out."""
  monkeypatch.setattr(blockwise, "GRAIN", 8)
  monkeypatch.setattr(blockwise, "_trim_pays", lambda *_: True)
  q_len = kv_len = 128
  rng = np.random.default_rng(11)
  q = jnp.asarray(rng.normal(size=(2, q_len, 2, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, kv_len, 1, 8)), jnp.float32) for _ in range(2))
  bias = jnp.asarray(rng.normal(size=(1, 2, q_len, kv_len)), jnp.float32)
  slopes = jnp.asarray([0.3, 0.05], jnp.float32)
  cot = rng.normal(size=q.shape)
  qi, ki = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  visible = (ki >= qi - 5) & (ki <= qi + 9)
  kw = dict(local_window_size=(5, 9), block_q=32, block_k=64)
  table = masks.band_block_mask(q_len, kv_len, 8, 8, window=(5, 9))
  visits = blockwise._visits(table.state, 32, 64, 8, 8, q_len, kv_len)
  assert blockwise._queries_outer(visits, 64)                  # the queries-outer walk
  assert len(visits["fwd"].groups) > 1                        # over trimmed visits

  def loss(q, k, v, bias, slopes):
    out = blockwise_attention(q, k, v, bias=bias, score_mod=mods.alibi(slopes), **kw)
    return jnp.sum(out * cot)

  grads = jax.grad(loss, (0, 1, 2, 3, 4))(q, k, v, bias, slopes)

  # float64: logits = q.k / sqrt(d) + bias + slope[h] (j - i), K/V head 0 for both query heads.
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  distance = (ki - qi).astype(np.float64)
  extra = np.asarray(bias, np.float64) + np.asarray(slopes, np.float64)[None, :, None, None] * distance
  k_rep, v_rep = np.repeat(k64, 2, axis=2), np.repeat(v64, 2, axis=2)
  scale = 8 ** -0.5
  s = np.einsum("bqhd,bkhd->bhqk", q64, k_rep) * scale + extra
  s = np.where(visible, s, -np.inf)
  e = np.exp(s - s.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  c64 = np.asarray(cot, np.float64)
  d_v = np.einsum("bhqk,bqhd->bkhd", p, c64).sum(2, keepdims=True)
  d_p = np.einsum("bqhd,bkhd->bhqk", c64, v_rep)
  d_s = p * (d_p - (d_p * p).sum(-1, keepdims=True))
  d_q = np.einsum("bhqk,bkhd->bqhd", d_s, k_rep) * scale
  d_k = (np.einsum("bhqk,bqhd->bkhd", d_s, q64) * scale).sum(2, keepdims=True)
  d_bias = d_s.sum(0, keepdims=True)
  d_slopes = (d_s * distance).sum((0, 2, 3))
  for got, want in zip(grads, (d_q, d_k, d_v, d_bias, d_slopes)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("tied", [None, "mask_mod", "score_mod"])
def test_trimmed_visits_with_lengths_bias_score_mod_and_grouped_heads(monkeypatch, tied):
  """Trimmed visits (keys of several lengths, every one masked: key lengths
  and a dense bias leave no block unmasked) in the forward and the
  backward's queries-outer walk, under causal documents, with a dense bias,
  learned ALiBi slopes (run keys-major in the backward) and two query heads
  per K/V head, against float64 NumPy with every term written out, forward
  and gradients (bias and slopes too). A mask_mod or score_mod that reads
  an array as long as its key block (``tied``) is not hoisted again for
  shorter blocks (its constant differs there): the kernel keeps whole blocks
  and gives the same answer."""
  monkeypatch.setattr(blockwise, "GRAIN", 8)
  monkeypatch.setattr(blockwise, "_trim_pays", lambda *_: True)
  calls = []

  class Recorded(blockwise._Static):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      calls.append(self)

  monkeypatch.setattr(blockwise, "_Static", Recorded)
  length, heads = 128, 2
  rng = np.random.default_rng(12)
  q = jnp.asarray(rng.normal(size=(2, length, heads, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, length, 1, 8)), jnp.float32) for _ in range(2))
  bias = jnp.asarray(rng.normal(size=(1, heads, length, length)), jnp.float32)
  slopes = jnp.asarray([0.2, 0.07], jnp.float32)
  kv_lengths = jnp.asarray([128, 77])
  cot = rng.normal(size=q.shape)
  ids = np.sort(rng.integers(0, 5, length)).astype(np.int32)
  qi, ki = np.arange(length)[:, None], np.arange(length)[None, :]
  visible = ((ids[:, None] == ids[None, :]) & (ki <= qi))[None, None] & (
      ki[None, None] < np.asarray(kv_lengths)[:, None, None, None])
  document = mods.document(ids[None])
  mask_mod = document
  if tied == "mask_mod":
    mask_mod = lambda b, h, qq, kk: document(b, h, qq, kk) & jnp.asarray(
        np.ones(kk.shape[-1], bool))
  score_mod = lambda slopes: mods.alibi(slopes)
  if tied == "score_mod":
    score_mod = lambda slopes: (lambda s, b, h, qq, kk: mods.alibi(slopes)(s, b, h, qq, kk)
                                + jnp.asarray(np.zeros(kk.shape[-1], np.float32)))

  def loss(q, k, v, bias, slopes):
    out = blockwise_attention(q, k, v, bias=bias, is_causal=True, mask_mod=mask_mod,
                              kv_lengths=kv_lengths, score_mod=score_mod(slopes),
                              block_q=32, block_k=64)
    return jnp.sum(out * cot), out

  grads, out = jax.grad(loss, (0, 1, 2, 3, 4), has_aux=True)(q, k, v, bias, slopes)
  # What the kernel itself walked: trimmed visits of several lengths, queries
  # outer in the backward; or whole blocks for a mod tied to the block shape.
  (st,) = calls
  assert st.queries_outer
  assert (st.visits["fwd"] is not st.visits["kv"]) == (tied is None)
  assert len(st.visits["fwd"].groups) > 1 or tied is not None

  distance = (ki - qi).astype(np.float64)
  extra = (np.asarray(bias, np.float64)
           + np.asarray(slopes, np.float64)[None, :, None, None] * distance)
  k_rep, v_rep = (np.repeat(np.asarray(x), 2, axis=2) for x in (k, v))
  want, (d_q, d_k, d_v, d_s) = _attention64(q, k_rep, v_rep, visible, cot,
                                            bias=np.broadcast_to(extra, (2,) + extra.shape[1:]))
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  expected = (d_q, d_k.sum(2, keepdims=True), d_v.sum(2, keepdims=True),
              d_s.sum(0, keepdims=True), (d_s * distance).sum((0, 2, 3)))
  for name, got, ref in zip(["q", "k", "v", "bias", "slopes"], grads, expected):
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("lengths", [(150, 97), (64, 40), (0, 150), (200, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_key_lengths_skip_padded_blocks_and_unmask_the_rest(lengths, with_bias):
  """Key lengths as the only masking: key blocks below every sequence's
  length run unmasked, those past the longest one's are skipped; against
  float64 NumPy with the padding written out, forward and gradients (with a
  bias too, whose gradient the skipped blocks must leave at zero)."""
  q, k, v = _inputs(8, 150, 150)
  cot = np.random.default_rng(9).normal(size=q.shape)
  kv_lengths = jnp.asarray(lengths)
  bias = (jnp.asarray(np.random.default_rng(10).normal(size=(2, 2, 150, 150)), jnp.float32)
          if with_bias else None)
  call = lambda q, k, v, bias: blockwise_attention(q, k, v, bias=bias, kv_lengths=kv_lengths,
                                                   block_q=32, block_k=32)
  visible = np.arange(150)[None, None, None, :] < np.minimum(lengths, 150)[:, None, None, None]
  want, wants = _attention64(q, k, v, visible, cot, bias=bias)
  np.testing.assert_allclose(call(q, k, v, bias), want, rtol=2e-5, atol=2e-5)
  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  grads = jax.grad(lambda *a: jnp.sum(call(*a) * cot), argnums)(q, k, v, bias)
  for got, ref in zip(grads, wants):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_placed_blocks_random_shapes_match_float64(monkeypatch, seed):
  """Random lengths, block sizes and masks (documents, windows, causal,
  random block patterns) on a grain of 8, forward and gradients against
  float64 NumPy: whichever walk and placement each draw gets."""
  monkeypatch.setattr(blockwise, "GRAIN", 8)
  rng = np.random.default_rng(100 + seed)
  q_len, kv_len = (int(x) for x in rng.integers(40, 161, 2))
  block_q, block_k = (int(x) for x in rng.choice([16, 24, 32, 48, 64], 2))
  q, k, v = _inputs(seed, q_len, kv_len, batch=1)
  cot = rng.normal(size=q.shape)
  qi, ki = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  causal = bool(rng.integers(2))
  window = tuple(int(x) for x in rng.integers(0, 40, 2)) if rng.integers(2) else None
  kind = ["documents", "blocks", "none"][int(rng.integers(3))]
  visible = np.ones((q_len, kv_len), bool)
  kw = {}
  if kind == "documents":
    q_ids = np.sort(rng.integers(0, 5, q_len)).astype(np.int32)
    kv_ids = np.sort(rng.integers(0, 5, kv_len)).astype(np.int32)
    kw["mask_mod"] = mods.document(q_ids[None], kv_ids[None])
    visible &= q_ids[:, None] == kv_ids[None, :]
  elif kind == "blocks":
    pattern = rng.random((q_len // 8 + 1, kv_len // 8 + 1)) < 0.3
    pattern = np.repeat(np.repeat(pattern, 8, 0), 8, 1)[:q_len, :kv_len]
    kw["mask_mod"] = lambda b, h, qq, kk: jnp.asarray(pattern)[qq, kk]
    visible &= pattern
  if causal:
    kw["is_causal"] = True
    visible &= ki <= qi
  if window is not None:
    kw["local_window_size"] = window
    visible &= (ki >= qi - window[0]) & (ki <= qi + window[1])
  if kind == "none" and not causal and window is None:
    kw["local_window_size"] = window = (7, 3)
    visible &= (ki >= qi - 7) & (ki <= qi + 3)
  call = lambda q, k, v: blockwise_attention(q, k, v, block_q=block_q, block_k=block_k, **kw)
  want, want_grads = _attention64(q, k, v, visible, cot)
  np.testing.assert_allclose(call(q, k, v), want, rtol=2e-5, atol=2e-5)
  grads = jax.grad(lambda q, k, v: jnp.sum(call(q, k, v) * cot), (0, 1, 2))(q, k, v)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
