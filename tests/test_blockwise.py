"""The blockwise kernel's own options: block sizes, block skipping, lengths, memory.

(Its agreement with the float64 reference across masks, bias, causal, windows,
dtypes and fully masked rows is in test_kernels.py, with every kernel.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import masks
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
