"""Every registered kernel against the float64 reference, forward and gradients.

Tolerances (absolute and relative, on outputs and on gradients):
  float32 inputs:  2e-5 (forward), 1e-4 (gradients): float32 accumulation over
                   <= 16 keys.
  bfloat16 inputs: 3e-2: bfloat16 keeps 8 bits of mantissa (~4e-3 relative per
                   rounding), and output and gradients are rounded once more.
The float64 reference sees the same (already rounded) inputs, so the tolerance
measures the kernel's arithmetic, not the input rounding.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
enable_x64 = lambda: jax.enable_x64(True)

from attention_lab import kernels
from attention_lab.kernels import masks

TOLERANCE = {
    jnp.float32: dict(forward=2e-5, grad=1e-4),
    jnp.bfloat16: dict(forward=3e-2, grad=3e-2),
}


def _inputs(seed, batch=(2,), q_len=7, kv_len=13, heads=4, kv_heads=4,
            head_dim=8, value_dim=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=batch + (q_len, heads, head_dim))
  k = rng.normal(size=batch + (kv_len, kv_heads, head_dim))
  v = rng.normal(size=batch + (kv_len, kv_heads, value_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _padding(batch, q_len, kv_len, seed):
  """Key padding, plus query padding that empties whole rows."""
  rng = np.random.default_rng(seed)
  kv_lengths = rng.integers(1, kv_len + 1, size=batch)
  q_lengths = rng.integers(1, q_len, size=batch)  # leaves >= 1 empty query row
  q_valid = masks.padding_mask(q_lengths, q_len)
  kv_valid = masks.padding_mask(kv_lengths, kv_len)
  return masks.attention_mask(q_valid, kv_valid)   # [batch, 1, q, kv]


CASES = {
    "plain": {},
    "padding_mask": {"mask": "padding"},
    "bias": {"bias": True},
    "causal": {"is_causal": True},
    "window": {"local_window_size": (2, 1)},
    "causal_window_bias_mask": {"is_causal": True, "local_window_size": 3,
                                "bias": True, "mask": "padding"},
    "grouped_query_heads": {"kv_heads": 2},
    "value_dim_differs": {"value_dim": 5},
    "length_one": {"q_len": 1, "kv_len": 1},
    "two_batch_dims": {"batch": (2, 3), "mask": "padding"},
    # The same without a dense mask, for kernels that take none (pallas).
    "two_batch_dims_causal": {"batch": (2, 3), "is_causal": True},
}


def _build(case, dtype, seed=0):
  case = dict(case)
  shape = {k: case.pop(k) for k in ("batch", "q_len", "kv_len", "kv_heads", "value_dim")
           if k in case}
  q, k, v = _inputs(seed, dtype=dtype, **shape)
  batch, q_len, kv_len = q.shape[:-3], q.shape[-3], k.shape[-3]
  kwargs = {}
  if case.pop("mask", None) == "padding":
    kwargs["mask"] = _padding(batch, q_len, kv_len, seed + 1)
  if case.pop("bias", False):
    rng = np.random.default_rng(seed + 2)
    kwargs["bias"] = jnp.asarray(rng.normal(size=(q.shape[-2], q_len, kv_len)), dtype)
  kwargs.update(case)
  return (q, k, v), kwargs


def _loss_grads(fn, q, k, v, bias, cotangent, **kwargs):
  """Gradients of ``sum(out * cotangent)`` wrt q, k, v (and bias)."""
  def loss(q, k, v, bias):
    out = fn(q, k, v, bias=bias, **kwargs)
    return jnp.sum(out.astype(cotangent.dtype) * cotangent)
  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  return jax.grad(loss, argnums=argnums)(q, k, v, bias)


def _reference64(q, k, v, kwargs, cotangent):
  with enable_x64():
    cast = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    q64, k64, v64 = (cast(x) for x in (q, k, v))
    kw = dict(kwargs)
    bias = cast(kw.pop("bias", None))
    out = kernels.reference_attention(q64, k64, v64, bias=bias, **kw)
    grads = _loss_grads(kernels.reference_attention, q64, k64, v64, bias,
                        jnp.asarray(cotangent, jnp.float64), **kw)
    return np.asarray(out), [np.asarray(g) for g in grads]


def _assert_close(got, want, tol, what):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


# Kernels that run on this backend (pallas runs interpreted on CPU).
# ring needs a device mesh: tests/test_ring.py checks it on simulated devices.
# Kernels of other semantics (linear attention) are checked against their own
# definition in their own test file.
RUNNABLE = [n for n in kernels.names()
            if jax.default_backend() in kernels.get(n).platforms and kernels.get(n).automatic
            and kernels.get(n).semantics == "softmax"]


def _skip_unless_supported(name, kwargs, dtype=None):
  features = kernels.requested_features(
      mask=kwargs.get("mask"), bias=kwargs.get("bias"),
      is_causal=kwargs.get("is_causal", False),
      local_window_size=kwargs.get("local_window_size"))
  missing = features - kernels.get(name).features
  if missing:
    pytest.skip(f"{name} declares no {sorted(missing)}")


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_float64_reference(name, case, dtype):
  (q, k, v), kwargs = _build(CASES[case], dtype)
  _skip_unless_supported(name, kwargs)
  out = jax.jit(lambda q, k, v, b: kernels.dot_product_attention(
      q, k, v, bias=b, implementation=name,
      **{x: y for x, y in kwargs.items() if x != "bias"}))(q, k, v, kwargs.get("bias"))
  assert out.dtype == dtype
  assert out.shape == q.shape[:-1] + (v.shape[-1],)
  cotangent = np.random.default_rng(9).normal(size=out.shape)
  want, want_grads = _reference64(q, k, v, kwargs, cotangent)
  tol = TOLERANCE[dtype]
  _assert_close(out, want, tol["forward"], f"{name} forward")

  kw = dict(kwargs)
  bias = kw.pop("bias", None)
  fn = lambda q, k, v, bias, **a: kernels.dot_product_attention(
      q, k, v, bias=bias, implementation=name, **a)
  grads = _loss_grads(fn, q, k, v, bias, jnp.asarray(cotangent, jnp.float32), **kw)
  for label, g, w in zip("qkvb", grads, want_grads):
    _assert_close(g, w, tol["grad"], f"{name} d{label}")


@pytest.mark.parametrize("name", RUNNABLE)
def test_fully_masked_rows_are_zero_with_finite_gradients(name):
  """Query row 2 of element 0 and all of element 1 see no key."""
  q, k, v = _inputs(3)
  dense = "mask" in kernels.get(name).features
  if dense:
    mask = jnp.ones((2, 1, 7, 13), bool).at[0, :, 2].set(False).at[1].set(False)
    options = {"mask": mask}
  else:  # kernels without dense masks pad by lengths: element 1 has no keys
    options = {"kv_lengths": jnp.array([13, 0])}
  out, vjp = jax.vjp(lambda q, k, v: kernels.dot_product_attention(
      q, k, v, implementation=name, **options), q, k, v)
  assert np.all(np.isfinite(np.asarray(out)))
  assert np.all(np.asarray(out[1]) == 0.0)
  if dense:
    assert np.all(np.asarray(out[0, 2]) == 0.0)
  grads = vjp(jnp.ones_like(out))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  # No gradient flows to the keys of the batch element that has none visible.
  assert np.all(np.asarray(grads[1][1]) == 0.0)


def test_reference_matches_independent_numpy_loops():
  """The ground truth itself, against the textbook formula written with loops."""
  q, k, v = (np.asarray(x, np.float64) for x in _inputs(5, batch=(1,), q_len=3, kv_len=4, heads=2, kv_heads=2))
  mask = np.array([[True, True, False, True], [False] * 4, [True] * 4])
  bias = np.random.default_rng(0).normal(size=(3, 4))
  want = np.zeros((1, 3, 2, 8))
  for h in range(2):
    for i in range(3):
      if not mask[i].any():
        continue
      logits = np.array([q[0, i, h] @ k[0, j, h] / np.sqrt(8) + bias[i, j] for j in range(4)])
      logits = np.where(mask[i], logits, -np.inf)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      want[0, i, h] = sum(p[j] * v[0, j, h] for j in range(4))
  with enable_x64():
    got = kernels.reference_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                      bias=jnp.asarray(bias), mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def _attention_by_loops(q, k, v, bias=None, mask=None, is_causal=False, window=None):
  """The textbook formula in float64, one (batch element, head, query) at a
  time: ``q [batch..., T, N, D]``, ``k [batch..., S, K, D]``, ``v [batch...,
  S, K, Dv]``; bias / mask broadcastable to ``[batch..., N, T, S]``; query
  head ``h`` reads key/value head ``h // (N // K)`` (jax.nn's grouping);
  causal keeps ``s <= t`` and a window ``(left, right)`` (an int ``w`` means
  ``(w, w)``) keeps ``t - left <= s <= t + right``, both start-aligned as in
  jax.nn. A query with no visible key gives zeros. Returns ``[batch..., T, N, Dv]``."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, (q_len, heads, head_dim) = q.shape[:-3], q.shape[-3:]
  kv_len, kv_heads = k.shape[-3], k.shape[-2]
  scores_shape = batch + (heads, q_len, kv_len)
  bias = np.zeros(scores_shape) if bias is None else np.broadcast_to(
      np.asarray(bias, np.float64), scores_shape)
  mask = np.ones(scores_shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool), scores_shape)
  if isinstance(window, int):
    window = (window, window)
  out = np.zeros(batch + (q_len, heads, v.shape[-1]))
  for b in np.ndindex(*batch):
    for h in range(heads):
      g = h // (heads // kv_heads)
      for t in range(q_len):
        logits, seen = [], []
        for s in range(kv_len):
          visible = mask[b + (h, t, s)]
          visible &= not is_causal or s <= t
          visible &= window is None or t - window[0] <= s <= t + window[1]
          if visible:
            logits.append(q[b + (t, h)] @ k[b + (s, g)] / np.sqrt(head_dim) + bias[b + (h, t, s)])
            seen.append(s)
        if not seen:
          continue
        p = np.exp(np.array(logits) - max(logits))
        p /= p.sum()
        out[b + (t, h)] = sum(w * v[b + (s, g)] for w, s in zip(p, seen))
  return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_numpy_loops_for_every_case(case):
  """The ground truth for every case the kernels are checked on (grouped K/V
  heads, value_dim != head_dim, two batch dims, causal + window + bias +
  padding with empty query rows, ...), against the loops above in float64."""
  (q, k, v), kwargs = _build(CASES[case], jnp.float32)
  kw = dict(kwargs)
  want = _attention_by_loops(q, k, v, bias=kw.pop("bias", None), mask=kw.pop("mask", None),
                             is_causal=kw.pop("is_causal", False),
                             window=kw.pop("local_window_size", None))
  assert not kw, kw
  with enable_x64():
    as64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
    got = kernels.reference_attention(*map(as64, (q, k, v)), bias=as64(kwargs.get("bias")),
                                      **{n: x for n, x in kwargs.items() if n != "bias"})
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_reference_matches_jax_nn_semantics_for_causal_and_window():
  """Causal and window masks mean what they mean in jax.nn (start-aligned)."""
  q, k, v = _inputs(1, q_len=5, kv_len=9)
  for kw in ({"is_causal": True}, {"local_window_size": (1, 2)},
             {"is_causal": True, "local_window_size": (2, 0)}):
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
    got = kernels.reference_attention(q, k, v, **kw)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str(kw))


def test_softmax_runs_in_float32_for_bfloat16_inputs():
  q, k, v = _inputs(2, dtype=jnp.bfloat16)
  weights = kernels.attention_weights(q, k)
  assert weights.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-6)


def test_dropout_matches_flax_semantics():
  import flax.linen as nn
  q, k, v = _inputs(4)
  rng = jax.random.key(7)
  got = kernels.dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=rng,
                                      deterministic=False, implementation="reference")
  want = nn.dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=rng,
                                  deterministic=False)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  same = kernels.dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=rng,
                                       deterministic=True)
  np.testing.assert_allclose(same, kernels.reference_attention(q, k, v), rtol=2e-5, atol=2e-5)


def test_kernels_compose_with_vmap_and_jit():
  q, k, v = _inputs(6, batch=(3,))
  for name in RUNNABLE:
    fn = lambda q, k, v: kernels.dot_product_attention(q, k, v, implementation=name,
                                                       is_causal=True)
    batched = jax.jit(jax.vmap(fn))(q[:, None], k[:, None], v[:, None])[:, 0]
    np.testing.assert_allclose(batched, fn(q, k, v), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- registry


def test_registry_lists_kernels_and_capabilities():
  assert {"reference", "jax_nn", "blockwise", "pallas", "cudnn"} <= set(kernels.names())
  caps = kernels.capabilities("reference")
  assert all(caps[f] for f in kernels.FEATURES)
  jax_caps = kernels.capabilities("jax_nn")
  assert jax_caps["mask"] and jax_caps["causal"] and not jax_caps["dropout"]
  assert "cpu" in jax_caps["platforms"]


def test_unknown_kernel_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown attention kernel 'flash9'.*reference"):
    kernels.get("flash9")
  q, k, v = _inputs(0)
  with pytest.raises(ValueError, match="flash9"):
    kernels.dot_product_attention(q, k, v, implementation="flash9")
  with pytest.raises(ValueError, match="flash9"):
    kernels.attention_fn("flash9")


def test_missing_feature_names_kernel_and_feature():
  q, k, v = _inputs(0)
  with pytest.raises(ValueError, match=r"'jax_nn' does not support 'dropout'"):
    kernels.dot_product_attention(q, k, v, implementation="jax_nn", dropout_rate=0.1,
                                  dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"'jax_nn' does not support 'weights'"):
    kernels.dot_product_attention(q, k, v, implementation="jax_nn", return_weights=True)


def test_default_dispatch_per_backend(monkeypatch):
  monkeypatch.setattr(kernels, "cudnn_available", lambda: True)   # as on a GPU machine
  assert kernels.preference("cpu")[0] == "blockwise"
  assert kernels.preference("gpu")[:2] == ["cudnn", "pallas"]
  assert kernels.preference("tpu")[:2] == ["splash", "pallas"]
  # Attention dropout: blockwise draws it in place; below its cut-over
  # length it yields to jax.nn, which has no dropout, so blockwise keeps it
  # rather than the materialised reference.
  short = kernels.checks.AttentionShape((1,), 128, 128, 8, 8, 64, 64)
  assert kernels.select(frozenset({"dropout"}), "cpu", "float32", short).name == "blockwise"
  assert kernels.select(frozenset({"dropout", "weights"}), "cpu", "float32",
                        short).name == "reference"
  assert kernels.select(frozenset({"dropout"}), "cpu", "float32",
                        short._replace(q_length=2048, kv_length=2048)).name == "blockwise"
  # On GPU: cuDNN for half precision, the Pallas kernel for float32, jax.nn
  # when a dense mask is asked for.
  shape = kernels.checks.AttentionShape((1,), 128, 128, 8, 8, 64, 64)
  assert kernels.select(frozenset({"causal"}), "gpu", "bfloat16", shape).name == "cudnn"
  assert kernels.select(frozenset({"causal"}), "gpu", "float32", shape).name == "pallas"
  assert kernels.select(frozenset({"mask"}), "gpu", "float32", shape).name == "jax_nn"
  odd = shape._replace(head_dim=20, value_dim=20)
  assert kernels.select(frozenset(), "gpu", "bfloat16", odd).name == "pallas"
  # On CPU, short sequences go to jax.nn, long ones to the blockwise kernel.
  long = shape._replace(q_length=4096, kv_length=4096)
  assert kernels.select(frozenset({"mask"}), "cpu", "float32", long).name == "blockwise"
  assert kernels.select(frozenset({"mask"}), "cpu", "float32", shape).name == "jax_nn"
  # Where jaxlib has no cuDNN, the GPU branch must not name it (jax.nn checks
  # for cuDNN while tracing): half precision goes to the Pallas kernel.
  monkeypatch.setattr(kernels, "cudnn_available", lambda: False)
  assert kernels.select(frozenset({"causal"}), "gpu", "bfloat16", shape).name == "pallas"
  # TPU: splash, then our Pallas kernel where splash's layout does not fit.
  assert kernels.select(frozenset({"causal"}), "tpu", "bfloat16", shape).name == "splash"
  assert kernels.select(frozenset(), "tpu", "float32",
                        shape._replace(value_dim=32)).name == "pallas"


def test_dispatch_logs_the_choice_and_what_it_skipped(caplog):
  import logging
  kernels.dispatch._LOGGED_CHOICES.clear()   # each choice is logged once per process
  q, k, v = _inputs(0, q_len=3, kv_len=3)
  with caplog.at_level(logging.INFO, logger="absl"):
    out = kernels.dot_product_attention(q, k, v, mask=jnp.tril(jnp.ones((3, 3), bool)))
    dropped = kernels.dot_product_attention(q, k, v, dropout_rate=0.5,
                                            dropout_rng=jax.random.key(0))
    _, weights = kernels.dot_product_attention(q, k, v, dropout_rate=0.5, return_weights=True,
                                               dropout_rng=jax.random.key(0))
  assert out.shape == dropped.shape == q.shape and weights.shape[-2:] == (3, 3)
  logged = lambda features: [r.getMessage().split("for ")[1] for r in caplog.records
                             if f"attention kernel on cpu for {features}" in r.getMessage()]
  # Three tokens: below blockwise's cut-over, so jax_nn runs what it can,
  # blockwise what jax_nn cannot (dropout), reference the weights.
  assert logged("['mask']") == ["['mask']: jax_nn; skipped blockwise (jax_nn is faster here)"]
  assert logged("['dropout']") == ["['dropout']: blockwise"]
  assert logged("['dropout', 'weights']") == [
      "['dropout', 'weights']: reference; skipped blockwise (lacks weights), "
      "jax_nn (lacks dropout, weights)"]


def test_explicit_kernel_checks_platform_and_dtype():
  q, k, v = _inputs(0)
  with pytest.raises(ValueError, match=r"'cudnn' does not run on 'cpu'"):
    kernels.dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match=r"'pallas' does not support 'mask'"):
    kernels.dot_product_attention(q, k, v, implementation="pallas", mask=jnp.ones((7, 13), bool))
  with enable_x64():
    q64 = jnp.asarray(np.asarray(q), jnp.float64)
    with pytest.raises(ValueError, match=r"'pallas' does not support dtype float64"):
      kernels.dot_product_attention(q64, q64, q64, implementation="pallas")


def test_dropout_without_rng_is_an_error():
  q, k, v = _inputs(0)
  with pytest.raises(ValueError, match="dropout_rng"):
    kernels.dot_product_attention(q, k, v, dropout_rate=0.1)


@pytest.mark.parametrize("bad, pattern", [
    (lambda q, k, v: (q, k[..., :5], v), "head_dim differ"),
    (lambda q, k, v: (q, k, v[:, :3]), "lengths differ"),
    (lambda q, k, v: (q[:1], k, v), "batch dimensions differ"),
    (lambda q, k, v: (q[..., :3, :], k, v), r"multiple of key/value heads"),
    (lambda q, k, v: (q[0, 0], k[0, 0], v[0, 0]), "at least 3 dims"),
    (lambda q, k, v: (q.astype(jnp.int32), k, v), "floating point"),
])
def test_bad_shapes_name_the_arrays(bad, pattern):
  q, k, v = bad(*_inputs(0))
  for name in RUNNABLE:
    with pytest.raises(ValueError, match=pattern) as info:
      kernels.dot_product_attention(q, k, v, implementation=name)
    assert "query" in str(info.value) and "key" in str(info.value)


def test_bad_mask_and_bias_shapes():
  q, k, v = _inputs(0)
  with pytest.raises(ValueError, match=r"mask shape \(2, 1, 7, 12\) does not broadcast"):
    kernels.dot_product_attention(q, k, v, mask=jnp.ones((2, 1, 7, 12), bool))
  with pytest.raises(ValueError, match=r"bias shape \(3, 7, 13\) does not broadcast"):
    kernels.dot_product_attention(q, k, v, bias=jnp.ones((3, 7, 13)))
  with pytest.raises(ValueError, match="mask must be boolean"):
    kernels.reference_attention(q, k, v, mask=jnp.ones((7, 13)))


def test_float_flax_masks_are_read_as_truthy():
  q, k, v = _inputs(0)
  float_mask = jnp.asarray(np.random.default_rng(0).random((2, 1, 7, 13)) > 0.3, jnp.float32)
  np.testing.assert_array_equal(
      kernels.dot_product_attention(q, k, v, mask=float_mask),
      kernels.dot_product_attention(q, k, v, mask=float_mask.astype(bool)))


# ---------------------------------------------------------------- masks


def test_mask_helpers():
  np.testing.assert_array_equal(masks.padding_mask(jnp.array([0, 2, 3]), 3),
                                [[0, 0, 0], [1, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(masks.causal_mask(3), np.tril(np.ones((3, 3), bool)))
  np.testing.assert_array_equal(masks.causal_mask(2, 4), [[1, 0, 0, 0], [1, 1, 0, 0]])
  band = masks.sliding_window_mask(4, window=(1, 0))
  np.testing.assert_array_equal(band, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
  pair = masks.attention_mask(jnp.array([[1, 1, 0]], bool), jnp.array([[1, 0]], bool))
  assert pair.shape == (1, 1, 3, 2)
  np.testing.assert_array_equal(pair[0, 0], [[1, 0], [1, 0], [0, 0]])
  assert masks.combine_masks(None, None) is None
  np.testing.assert_array_equal(masks.combine_masks(masks.causal_mask(3), band[:3, :3]),
                                [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
  assert masks.key_padding_mask(jnp.array([1, 2]), 3).shape == (2, 1, 1, 3)
  with pytest.raises(ValueError, match="window"):
    masks.sliding_window_mask(3, window=(-1, 0))


@pytest.mark.parametrize("q_len, kv_len, window", list(itertools.product((1, 4), (1, 5), (0, 2))))
def test_window_and_causal_masks_match_jax_nn(q_len, kv_len, window):
  """Causal plus a ``(window, 0)`` band: the mask helpers give the pairs
  written as index comparisons; the reference's flags give the float64 loops'
  answer and, on every row with a key, jax.nn's (jax.nn gives an empty row
  the mean of the values, ours zeros)."""
  q, k, v = _inputs(8, q_len=q_len, kv_len=kv_len)
  t, s = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  pairs = (s <= t) & (s >= t - window)                            # [q, kv]
  got = kernels.reference_attention(q, k, v, is_causal=True, local_window_size=(window, 0))
  np.testing.assert_allclose(got, _attention_by_loops(q, k, v, mask=pairs), rtol=1e-5, atol=1e-5)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window, 0),
                                      implementation="xla")
  rows = pairs.any(-1)
  np.testing.assert_allclose(np.asarray(got)[:, rows], np.asarray(want)[:, rows],
                             rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(got)[:, ~rows], 0.0)
  explicit = masks.combine_masks(masks.causal_mask(q_len, kv_len),
                                 masks.sliding_window_mask(q_len, kv_len, (window, 0)))
  np.testing.assert_array_equal(explicit, pairs)


# Lengths that span several blocks, with the blockwise kernel's blocks made
# small (32 x 64) so the test stays fast: 256 is an exact multiple of both
# (the paths that skip masking), 200 is ragged (a padded last block).
MULTI_BLOCK_TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 4e-2, jnp.float16: 1e-2}


def _bias(kind, heads, q_len, kv_len, rng):
  if kind == "normal":
    return rng.normal(size=(heads, q_len, kv_len))
  if kind == "neg_inf_half":        # padding written as a -inf bias on half the keys
    return np.where(np.arange(kv_len) < kv_len // 2, -np.inf, 0.0)[None, None, :] + 0 * rng.normal(
        size=(heads, q_len, 1))
  if kind == "finfo_min_half":
    return np.where(np.arange(kv_len) < kv_len // 2, np.finfo(np.float32).min, 0.0)[None, None, :]
  if kind == "neg_inf_rows":        # some queries see no key at all
    b = rng.normal(size=(heads, q_len, kv_len))
    b[:, ::7, :] = -np.inf
    return b
  raise ValueError(kind)


MULTI_BLOCK_CASES = {
    "plain": {},
    "neg_inf_bias": {"bias": "neg_inf_half"},
    "neg_inf_bias_causal": {"bias": "neg_inf_half", "is_causal": True},
    "finfo_min_bias": {"bias": "finfo_min_half"},
    "neg_inf_rows": {"bias": "neg_inf_rows"},
    "bias_mask": {"bias": "normal", "mask": "padding"},
    "causal": {"is_causal": True},
    "window": {"local_window_size": (40, 3)},
    "grouped_causal_kv_lengths": {"kv_heads": 1, "is_causal": True, "kv_lengths": True},
}


HALF_PRECISION_CASES = ("neg_inf_bias_causal", "bias_mask", "grouped_causal_kv_lengths")
MULTI_BLOCK_PARAMS = (
    [(c, n, jnp.float32) for c in sorted(MULTI_BLOCK_CASES) for n in (256, 200)]
    + [(c, 256, d) for c in HALF_PRECISION_CASES for d in (jnp.bfloat16, jnp.float16)])


@pytest.mark.parametrize(
    "case,length,dtype", MULTI_BLOCK_PARAMS,
    ids=[f"{c}-{n}-{jnp.dtype(d).name}" for c, n, d in MULTI_BLOCK_PARAMS])
def test_blockwise_across_blocks_matches_float64(case, length, dtype):
  spec = dict(MULTI_BLOCK_CASES[case])
  rng = np.random.default_rng(3)
  heads, kv_heads = 2, spec.pop("kv_heads", 2)
  q, k, v = _inputs(4, batch=(2,), q_len=length, kv_len=length, heads=heads,
                    kv_heads=kv_heads, head_dim=16, value_dim=16, dtype=dtype)
  kwargs = {}
  bias_kind = spec.pop("bias", None)
  if bias_kind:
    kwargs["bias"] = jnp.asarray(_bias(bias_kind, heads, length, length, rng), jnp.float32)
  if spec.pop("mask", None):
    kwargs["mask"] = _padding((2,), length, length, 5)
  if spec.pop("kv_lengths", False):
    lengths = jnp.array([length, 77])
    kwargs["mask"] = masks.key_padding_mask(lengths, length)   # the reference's view
    kernel_lengths = {"kv_lengths": lengths}
  else:
    kernel_lengths = {}
  kwargs.update(spec)
  kernel_kwargs = {x: y for x, y in kwargs.items() if not (kernel_lengths and x == "mask")}
  kernel_kwargs.update(kernel_lengths)
  cotangent = np.random.default_rng(9).normal(size=q.shape[:-1] + (v.shape[-1],))

  def run(q, k, v, bias=None, **kw):
    return kernels.dot_product_attention(q, k, v, bias=bias, implementation="blockwise",
                                         block_q=32, block_k=64, **kw)
  bias = kernel_kwargs.pop("bias", None)
  out = jax.jit(lambda q, k, v, b: run(q, k, v, b, **kernel_kwargs))(q, k, v, bias)
  grads = jax.jit(lambda q, k, v, b: _loss_grads(run, q, k, v, b, jnp.asarray(cotangent, dtype),
                                                 **kernel_kwargs))(q, k, v, bias)
  want, want_grads = _reference64(q, k, v, kwargs, cotangent)
  tol = MULTI_BLOCK_TOLERANCE[dtype]
  _assert_close(out, want, tol, f"{case} forward")
  scale = max(1.0, float(np.abs(want_grads[0]).max()))
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), grads, want_grads):
    _assert_close(g, w, tol * scale, f"{case} {name}")


def test_neg_inf_bias_at_default_blocks_regression():
  """2,048 keys, the first half behind a -inf bias, default dispatch (the
  blockwise kernel at its default blocks): once all zeros."""
  q, k, v = _inputs(0, batch=(1,), q_len=2048, kv_len=2048, heads=2, kv_heads=2,
                    head_dim=16, value_dim=16)
  bias = jnp.where(jnp.arange(2048) < 1024, -jnp.inf, 0.0)[None, None, None, :]
  assert kernels.select(frozenset({"bias"}), "cpu", "float32",
                        kernels.checks.AttentionShape((1,), 2048, 2048, 2, 2, 16, 16)
                        ).name == "blockwise"
  out = kernels.dot_product_attention(q, k, v, bias=bias)
  want = np.einsum("btnk,bknd->btnd",
                   _softmax64(np.einsum("btnd,bknd->btnk", np.float64(q)[..., :, :, :],
                                        np.float64(k)[:, 1024:]) / 4.0),
                   np.float64(v)[:, 1024:])
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def _softmax64(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", ["reference", "jax_nn", "blockwise"])
def test_rows_hidden_by_neg_inf_bias_give_zeros_and_finite_gradients(name):
  q, k, v = _inputs(1, q_len=9, kv_len=11)
  bias = jnp.zeros((4, 9, 11)).at[:, 3, :].set(-jnp.inf)
  f = lambda q, k, v: kernels.dot_product_attention(q, k, v, bias=bias, implementation=name)
  out = f(q, k, v)
  np.testing.assert_array_equal(out[:, 3], 0.0)
  assert np.all(np.isfinite(out))
  grads = jax.grad(lambda *a: jnp.sum(f(*a)), (0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_flax_attention_fn_contract_precision_dtype_and_decode():
  """Our dot_product_attention as Flax's attention_fn: every keyword Flax
  passes is honoured, as Flax's own attention honours it."""
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  for precision in (None, jax.lax.Precision.HIGHEST):
    for dtype in (jnp.float32, jnp.bfloat16):
      make = lambda fn: nn.MultiHeadDotProductAttention(
          num_heads=4, dtype=dtype, precision=precision, attention_fn=fn)
      ours, flax_own = make(kernels.dot_product_attention), make(nn.dot_product_attention)
      params = flax_own.init(jax.random.key(1), x)
      got, want = ours.apply(params, x), flax_own.apply(params, x)
      assert got.dtype == want.dtype == dtype
      np.testing.assert_allclose(np.float32(got), np.float32(want),
                                 atol=2e-5 if dtype == jnp.float32 else 3e-2)
  # Flax's own incremental decoding (it passes precision to attention_fn).
  make = lambda fn: nn.MultiHeadDotProductAttention(
      num_heads=4, decode=True, precision=jax.lax.Precision.HIGHEST, attention_fn=fn)
  ours, flax_own = make(kernels.dot_product_attention), make(nn.dot_product_attention)
  variables = flax_own.init(jax.random.key(1), x)
  got_cache, want_cache = variables["cache"], variables["cache"]
  for t in range(x.shape[1]):
    step = x[:, t:t + 1]
    got, got_state = ours.apply({**variables, "cache": got_cache}, step, mutable=["cache"])
    want, want_state = flax_own.apply({**variables, "cache": want_cache}, step,
                                      mutable=["cache"])
    got_cache, want_cache = got_state["cache"], want_state["cache"]
    np.testing.assert_allclose(got, want, atol=2e-5)
  # The keyword's dtype casts the inputs and the output, as Flax's does.
  q, k, v = _inputs(0)
  assert kernels.dot_product_attention(q, k, v, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_complex_inputs_are_refused_by_name():
  q, k, v = _inputs(0)
  with pytest.raises(ValueError, match="complex query"):
    kernels.dot_product_attention(q.astype(jnp.complex64), k, v)
