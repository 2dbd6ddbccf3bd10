"""``dot_product_attention`` as a drop-in for ``jax.nn.dot_product_attention``.

The same call, with jax.nn's keywords, is made on jax.nn and on ours under
every kernel that runs on a CPU (the accelerator kernels through their
interpreters), forward and gradients. What differs by design, and is checked
as such:

* a query with no visible key: jax.nn returns the mean of the values (and a
  large finite log-sum-exp); ours return zeros (and ``-inf``);
* the residual: jax.nn stops its gradient and keeps the input dtype; ours is
  float32 and differentiable, so its gradient is checked against the
  log-sum-exp written out below, not against jax.nn.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels

B, T, S, N, K, D = 2, 80, 96, 4, 2, 16     # grouped K/V heads: 4 query heads share 2
Q_LENGTHS = np.array([80, 51], np.int32)
KV_LENGTHS = np.array([96, 37], np.int32)

# Small blocks so the fused kernels walk several query and key blocks.
KERNELS = {
    "reference": {},
    "jax_nn": {},
    "blockwise": {"block_q": 32, "block_k": 32},
    "pallas": {"interpret": True, "block_q": 16, "block_k": 32},
    "splash": {"interpret": True},
}

CASES = {
    "bias": {"bias": "random"},
    "neg_inf_bias": {"bias": "neg_inf"},
    "mask": {"mask": "random"},
    "causal": {"is_causal": True},
    "window_int": {"local_window_size": 6},
    "window_pair_causal": {"local_window_size": (9, 0), "is_causal": True},
    "window_pair": {"local_window_size": (3, 11)},
    "causal_lengths": {"is_causal": True, "query_seq_lengths": Q_LENGTHS,
                       "key_value_seq_lengths": KV_LENGTHS},
}
# jax.nn's tolerances for its own implementations, by dtype.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _inputs(dtype, seed=0, batch=(B,)):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(keys[0], batch + (T, N, D), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], batch + (S, K, D), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], batch + (S, K, D), jnp.float32).astype(dtype)
  return q, k, v, keys[3:]


def _call_arguments(case, dtype, extra_keys):
  """The case's keyword arguments as arrays (the same for jax.nn and ours)."""
  kw = dict(CASES[case])
  if kw.get("bias") == "random":
    kw["bias"] = jax.random.normal(extra_keys[0], (B, N, T, S), jnp.float32).astype(dtype)
  elif kw.get("bias") == "neg_inf":
    bias = np.zeros((1, N, T, S), np.float32)
    bias[..., 5::7] = -np.inf          # some keys hidden for every query
    bias[:, 1, :, :60] = -np.inf       # and most of one head's keys
    kw["bias"] = jnp.asarray(bias, dtype)
  if kw.get("mask") == "random":
    mask = np.array(jax.random.bernoulli(extra_keys[1], 0.6, (B, 1, T, S)))
    mask[..., 7, :] = False            # a query with no key at all
    kw["mask"] = jnp.asarray(mask)
  for name in ("query_seq_lengths", "key_value_seq_lengths"):
    if name in kw:
      kw[name] = jnp.asarray(kw[name])
  return kw


def _visible(kw):
  """bool ``[B, N, T, S]``: the (query, key) pairs a call attends, from the
  keywords alone (jax.nn's documented semantics)."""
  t = np.arange(T)[:, None]
  s = np.arange(S)[None, :]
  vis = np.ones((B, N, T, S), bool)
  if kw.get("is_causal"):
    vis &= s <= t
  window = kw.get("local_window_size")
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    vis &= (s >= t - left) & (s <= t + right)
  if "bias" in kw:
    vis &= ~np.isneginf(np.asarray(kw["bias"], np.float32))
  if "mask" in kw:
    vis &= np.asarray(kw["mask"])
  if "key_value_seq_lengths" in kw:
    vis &= s[None, None] < np.asarray(kw["key_value_seq_lengths"])[:, None, None, None]
  if "query_seq_lengths" in kw:
    vis &= t[None, None] < np.asarray(kw["query_seq_lengths"])[:, None, None, None]
  return vis


def _logsumexp_written_out(q, k, bias, vis):
  """``log sum_j exp(q.k_j / sqrt(D) + bias_j)`` over visible keys, float64
  ``[B, T, N]`` (a differentiable formula independent of the kernels)."""
  k = jnp.repeat(k.astype(jnp.float64), N // K, axis=2)
  s = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float64), k) / np.sqrt(D)
  if bias is not None:
    s = s + jnp.where(jnp.isneginf(bias), 0.0, bias.astype(jnp.float64))
  m = jax.lax.stop_gradient(jnp.max(jnp.where(vis, s, -1e300), -1, keepdims=True))
  total = jnp.sum(jnp.where(vis, jnp.exp(jnp.where(vis, s, m) - m), 0.0), -1)
  lse = m[..., 0] + jnp.log(jnp.where(total > 0, total, 1.0))
  return jnp.swapaxes(lse, 1, 2)


def _supports(name, case, residual=True):
  spec = kernels.get(name)
  kw = CASES[case]
  features = kernels.requested_features(
      mask=kw.get("mask"), bias=kw.get("bias"), is_causal=kw.get("is_causal", False),
      local_window_size=kw.get("local_window_size"), residual=residual)
  if "query_seq_lengths" in kw or "key_value_seq_lengths" in kw:
    if not (spec.takes("kv_lengths") or "mask" in spec.features):
      return False
  return features <= spec.features


# jax_nn is jax.nn behind our wrapper: its cases are the ones the wrapper
# touches (biases, masks, lengths, windows); the others run every case.
WRAPPER_CASES = ("bias", "neg_inf_bias", "mask", "window_pair", "causal_lengths")
PAIRS = [(name, case) for name in KERNELS for case in CASES
         if _supports(name, case, residual=False)
         and (name != "jax_nn" or case in WRAPPER_CASES)]


def _pair(result):
  """``(out, residual)``; a zero residual where the kernel returned none."""
  return result if isinstance(result, tuple) else (result, jnp.zeros(result.shape[:-1]))


def _loss_weights(kw):
  """Weights on the output rows that have a key (the rows jax.nn and we
  agree on), ``[B, T, N, 1]``, and the same rows as a bool ``[B, T, N]``."""
  rows = np.swapaxes(_visible(kw).any(-1), 1, 2)
  return jnp.asarray(rows, jnp.float32)[..., None], rows


@pytest.mark.parametrize("name, case", PAIRS, ids=[f"{n}-{c}" for n, c in PAIRS])
def test_same_call_as_jax_nn_forward_gradients_and_residual(name, case):
  q, k, v, extra = _inputs(jnp.float32)
  kw = _call_arguments(case, jnp.float32, extra)
  weights, rows = _loss_weights(kw)
  visible = _visible(kw)
  bias = kw.pop("bias", None)
  # splash has no differentiable residual (dispatch sends such calls to pallas).
  residual = _supports(name, case)
  ours = lambda q, k, v, bias: _pair(kernels.dot_product_attention(
      q, k, v, bias=bias, implementation=name, return_residual=residual, **kw, **KERNELS[name]))
  theirs = lambda q, k, v, bias: jax.nn.dot_product_attention(
      q, k, v, bias=bias, return_residual=True, **kw)
  out, lse = jax.jit(ours)(q, k, v, bias)
  want, want_lse = jax.jit(theirs)(q, k, v, bias)

  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(want)[rows], atol=2e-5)
  np.testing.assert_array_equal(np.asarray(out)[~rows], 0.0)      # ours: zeros, not the mean
  if residual:
    assert lse.shape == (B, T, N) and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(want_lse)[rows], atol=2e-5)
    assert np.all(np.isneginf(np.asarray(lse)[~rows]))

  # One loss on the output (rows with keys) and on the residual. Expected
  # gradients: jax.nn's for the output part (jax.nn stops the residual's),
  # the formula written out above for the residual part.
  mix = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (B, T, N)))
  out_loss = lambda o: jnp.sum(weights * o * jnp.cos(o))
  lse_loss = lambda r: jnp.sum(jnp.where(rows, mix * r, 0.0))
  args = (q, k, v, bias)
  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  got = jax.jit(jax.grad(lambda *a: out_loss(ours(*a)[0]) + lse_loss(ours(*a)[1]),
                         argnums))(*args)
  from_out = jax.jit(jax.grad(lambda *a: out_loss(theirs(*a)[0]), argnums))(*args)
  from_lse = [0.0] * len(argnums)
  if residual:
    with jax.enable_x64(True):
      as64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
      formula = lambda q, k, v, b: lse_loss(_logsumexp_written_out(q, k, b, visible))
      from_lse = [np.asarray(g) for g in
                  jax.jit(jax.grad(formula, argnums))(*map(as64, args))]
  for which, g, e1, e2 in zip("qkvb", got, from_out, from_lse):
    g, e = np.asarray(g, np.float64), np.asarray(e1, np.float64) + e2
    if which == "b":                  # -inf bias entries: no gradient either way
      hidden = np.isneginf(np.asarray(bias))
      g, e = np.where(hidden, 0, g), np.where(hidden, 0, e)
    np.testing.assert_allclose(g, e, atol=1e-4, err_msg=which)


HALF = [(name, case, dtype) for name in KERNELS for case in ("bias", "causal_lengths")
        for dtype in (jnp.bfloat16, jnp.float16)
        if _supports(name, case, residual=False)
        and str(jnp.dtype(dtype)) in kernels.get(name).dtypes]


@pytest.mark.parametrize("name, case, dtype", HALF,
                         ids=[f"{n}-{c}-{jnp.dtype(d).name}" for n, c, d in HALF])
def test_half_precision_within_jax_tolerances(name, case, dtype):
  """bfloat16 and float16 against jax.nn on the same half-precision inputs,
  forward and gradients, at jax.nn's tolerance for the dtype."""
  q, k, v, extra = _inputs(dtype, seed=3)
  kw = _call_arguments(case, dtype, extra)
  weights, rows = _loss_weights(kw)
  ours = lambda q, k, v: kernels.dot_product_attention(
      q, k, v, implementation=name, **kw, **KERNELS[name])
  # jax.nn computed in float32 from the same half inputs: both sides then
  # differ from it only by their own rounding.
  theirs = lambda q, k, v: jax.nn.dot_product_attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      **{n: (x.astype(jnp.float32) if n == "bias" else x) for n, x in kw.items()})
  out = jax.jit(ours)(q, k, v)
  assert out.dtype == dtype
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32)[rows],
                             np.asarray(jax.jit(theirs)(q, k, v))[rows], atol=tol, rtol=tol)
  loss = lambda f: lambda q, k, v: jnp.sum(weights * f(q, k, v).astype(jnp.float32))
  got = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
  expected = jax.jit(jax.grad(loss(theirs), (0, 1, 2)))(q, k, v)
  for which, g, e in zip("qkv", got, expected):
    assert g.dtype == dtype
    scale = float(np.max(np.abs(np.asarray(e))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e), atol=tol * scale * 4,
                               err_msg=which)


@pytest.mark.parametrize("name", [n for n in KERNELS if _supports(n, "causal_lengths")])
def test_vmap_over_a_leading_axis_and_unbatched_inputs(name):
  """jax.nn takes ``[T, N, H]`` inputs and vmaps; so does ours."""
  q, k, v, _ = _inputs(jnp.float32, seed=5, batch=(3,))
  ours = jax.vmap(lambda q, k, v: kernels.dot_product_attention(
      q, k, v, is_causal=True, implementation=name, return_residual=True, **KERNELS[name]))
  theirs = jax.vmap(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, return_residual=True))
  (out, lse), (want, want_lse) = jax.jit(ours)(q, k, v), jax.jit(theirs)(q, k, v)
  assert out.shape == (3, T, N, D) and lse.shape == (3, T, N)
  np.testing.assert_allclose(out, want, atol=2e-5)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5)


def test_residual_needs_a_kernel_that_has_it():
  """splash has no differentiable residual: on TPU dispatch picks our Pallas
  kernel for ``return_residual`` and says why; naming splash is an error."""
  assert kernels.select(kernels.requested_features(residual=True), "tpu").name == "pallas"
  assert kernels.select(kernels.requested_features(residual=True), "gpu").name == "pallas"
  assert kernels.select(kernels.requested_features(), "tpu").name == "splash"
  q, k, v, _ = _inputs(jnp.float32)
  with pytest.raises(ValueError, match=r"'splash' does not support 'residual'"):
    kernels.dot_product_attention(q, k, v, implementation="splash", interpret=True,
                                  return_residual=True)
  with pytest.raises(ValueError, match="return_weights or return_residual"):
    kernels.dot_product_attention(q, k, v, return_weights=True, return_residual=True)


def test_jax_implementation_names(monkeypatch):
  """jax.nn's implementation names run our wrappers of jax.nn's own paths:
  ``"xla"`` the jax_nn kernel, which calls ``jax.nn.dot_product_attention``
  with no implementation (XLA's on a CPU), ``"cudnn"`` the cudnn kernel,
  which asks jax.nn for cuDNN (GPU only). Recorded at the call into jax.nn:
  any correct kernel would match jax.nn's output."""
  assert kernels.registry.parse_choice("xla") == "jax_nn"
  assert kernels.registry.parse_choice("cudnn") == "cudnn"
  asked = []
  jax_nn_attention = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kw):
    asked.append(implementation)
    # cuDNN cannot run here: what matters is that it was asked for.
    return jax_nn_attention(*args, implementation=None if implementation == "cudnn"
                            else implementation, **kw)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  q, k, v, _ = _inputs(jnp.float32)
  want = jax_nn_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(kernels.dot_product_attention(q, k, v, implementation="xla"),
                             want, atol=2e-5)
  assert asked == [None]
  kernels.dot_product_attention(q, k, v, implementation="blockwise")
  assert asked == [None]                               # other kernels do not call jax.nn
  np.testing.assert_allclose(kernels.get("cudnn").fn(q, k, v), want, atol=2e-5)
  assert asked == [None, "cudnn"]
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match=r"'cudnn' does not run on 'cpu'"):
      kernels.dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match=r"unknown attention kernel 'triton'; known kernels: "
                                       r"blockwise, cudnn, jax_nn"):
    kernels.dot_product_attention(q, k, v, implementation="triton")


def test_cudnn_kernel_gives_cudnn_only_windows_it_takes(monkeypatch):
  """jax.nn's cuDNN path takes a window's left side only (a right side just
  beside a plain causal mask, and not with padding). Causal windows reach it
  with the right side dropped (causal hides those keys anyway); a window
  looking right without causal runs on jax.nn's XLA formulation. Recorded at
  the call into jax.nn, and the outputs against the float64 reference."""
  asked = []
  jax_nn_attention = jax.nn.dot_product_attention

  def recording(*args, implementation=None, local_window_size=None, **kw):
    asked.append((implementation, local_window_size))
    return jax_nn_attention(*args, implementation=None, local_window_size=local_window_size,
                            **kw)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  q, k, v, _ = _inputs(jnp.float32)
  mask = jnp.asarray(np.random.default_rng(3).random((B, 1, T, S)) < 0.8)
  cudnn = kernels.get("cudnn").fn
  for kwargs, want_call in [
      (dict(is_causal=True, local_window_size=3, mask=mask), ("cudnn", (3, 0))),
      (dict(is_causal=True, local_window_size=(2, 5)), ("cudnn", (2, 0))),
      (dict(local_window_size=(4, 0), mask=mask), ("cudnn", (4, 0))),
      (dict(local_window_size=(4, 2)), (None, (4, 2))),
  ]:
    asked.clear()
    out = cudnn(q, k, v, **kwargs)
    assert asked == [want_call], (kwargs, asked)
    with jax.enable_x64(True):
      want = kernels.reference_attention(*(jnp.asarray(np.asarray(x, np.float64))
                                           for x in (q, k, v)), **kwargs)
    np.testing.assert_allclose(out, want, atol=2e-5, err_msg=str(kwargs))


def test_dispatch_skips_cudnn_for_windows_it_takes_only_in_part(monkeypatch):
  """cuDNN (where jaxlib has it) is GPU dispatch's first choice in half
  precision; a window that looks right without causal goes to the next
  kernel (pallas runs it fused) instead of cudnn's XLA fallback."""
  monkeypatch.setattr(kernels, "cudnn_available", lambda: True)
  shape = kernels.checks.AttentionShape((2,), 512, 512, 4, 4, 64, 64)
  bf16 = jnp.dtype(jnp.bfloat16)
  window = frozenset({"window"})
  pick = lambda features, sides: kernels.select(features, "gpu", bf16, shape, window=sides).name
  assert pick(window, (4, 2)) == "pallas"
  assert pick(window, (4, 0)) == "cudnn"
  assert pick(window | {"causal"}, (4, 4)) == "cudnn"
  assert kernels.get("cudnn").limit("gpu", shape, bf16, window, window=(4, 2)) == (
      "no window looking right without causal (2 keys)")
