"""The Pallas kernel's own options, run in Pallas's interpreter on CPU.

(Agreement with the float64 reference for plain, causal, windowed, grouped-
query and odd-length attention in float32 and bfloat16 is in test_kernels.py,
with every kernel; on CPU the Pallas kernel runs there interpreted.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels.pallas import pallas_attention


def _inputs(seed, q_len, kv_len, batch=2, heads=2, dim=8):
  rng = np.random.default_rng(seed)
  make = lambda length: jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
  return make(q_len), make(kv_len), make(kv_len)


def _softmax_attention64(q, k, v, visible):
  """float64 softmax attention over a written-out ``visible`` ``[b, 1, t, s]``
  (jax.numpy under x64, so it also gives reference gradients); q ``[b, t, n,
  d]``, k, v ``[b, s, n, d]``. A row with no visible key gives zeros (the
  kernels' contract), with zero, not NaN, gradients."""
  s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(visible, s, -jnp.inf)
  top = jax.lax.stop_gradient(s.max(-1, keepdims=True))
  w = jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0))     # 0 where hidden
  total = w.sum(-1, keepdims=True)
  return jnp.einsum("bnts,bsnd->btnd", w / jnp.where(total > 0, total, 1.0), v)


@pytest.mark.parametrize("form", [{}, {"is_causal": True}, {"local_window_size": (4, 2)}])
def test_kv_lengths_and_small_blocks_match_float64(form):
  """Blocks of 16 over 40 queries and 45 keys (partial last blocks), one
  sequence padded to 7 keys (so with the window its rows from 11 on see no
  key): forward and gradients against float64 attention whose mask is written
  here with index comparisons."""
  q, k, v = _inputs(0, 40, 45)
  kv_lengths = jnp.array([45, 7])
  cot = np.random.default_rng(1).normal(size=q.shape)
  f = lambda q, k, v: pallas_attention(q, k, v, kv_lengths=kv_lengths, block_q=16,
                                       block_k=16, interpret=True, **form)
  i, j = np.arange(40)[:, None], np.arange(45)[None, :]
  visible = np.ones((40, 45), bool)
  if form.get("is_causal"):
    visible &= j <= i
  if "local_window_size" in form:
    left, right = form["local_window_size"]
    visible &= (j >= i - left) & (j <= i + right)
  visible = visible[None, None] & (j[None, None] < np.asarray(kv_lengths)[:, None, None, None])
  assert "local_window_size" not in form or not visible[1, 0, 11:].any()   # empty rows
  got = f(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
    want = _softmax_attention64(*args, visible)
    want_grads = jax.grad(lambda *a: jnp.sum(_softmax_attention64(*a, visible) * cot),
                          (0, 1, 2))(*args)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  for which, a, b in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=which)


def test_bad_options():
  q, k, v = _inputs(2, 16, 16)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    pallas_attention(q, k, v, block_q=48)
  with pytest.raises(ValueError, match=r"kv_lengths shape \(3,\) must equal"):
    pallas_attention(q, k, v, kv_lengths=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="'pallas' does not support mask"):
    pallas_attention(q, k, v, mask=jnp.ones((16, 16), bool))


def test_dropout_needs_a_key_and_is_off_when_deterministic():
  q, k, v = _inputs(5, 20, 20)
  with pytest.raises(ValueError, match="needs dropout_rng"):
    pallas_attention(q, k, v, dropout_rate=0.1, interpret=True)
  np.testing.assert_array_equal(
      kernels.dot_product_attention(q, k, v, implementation="pallas", interpret=True,
                                    dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0),
                                    deterministic=True),
      pallas_attention(q, k, v, interpret=True))


@pytest.mark.parametrize("target", ["interpret", "tpu_interpret"])
@pytest.mark.parametrize("bias_shape", [(1, 2, 150, 150), (2, 1, 150, 150), (2, 150)],
                         ids=["shared_over_batch", "per_sequence_shared_over_heads", "keys_only"])
def test_bias_forward_and_gradients_match_float64(bias_shape, target):
  """An additive bias, some of it -inf, read per block: output and gradients
  wrt q, k, v and the bias itself against dense float64 attention written out
  here; causal, padded keys, several blocks, GPU and TPU layouts."""
  q, k, v = _inputs(6, 150, 150, batch=2, heads=2, dim=8)
  rng = np.random.default_rng(3)
  bias = rng.normal(size=bias_shape)
  bias[..., 11] = -np.inf                                   # a key hidden by the bias
  if len(bias_shape) == 2:                                   # [batch, kv] -> [batch, 1, 1, kv]
    bias = bias[:, None, None, :]
  bias = jnp.asarray(bias, jnp.float32)
  kv_lengths = jnp.array([150, 70])
  f = lambda q, k, v, b: pallas_attention(q, k, v, b, is_causal=True, kv_lengths=kv_lengths,
                                          block_q=32, block_k=64, target=target)
  visible = np.tril(np.ones((150, 150), bool))[None, None] & (
      np.arange(150)[None, None, None, :] < np.asarray(kv_lengths)[:, None, None, None])

  def dense(q, k, v, b):                   # float64, [b, t, n, d]
    s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(8) + jnp.where(jnp.isneginf(b), 0, b)
    s = jnp.where(visible & ~np.isneginf(np.asarray(bias)), s, -jnp.inf)
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, axis=-1), v)

  cot = np.random.default_rng(4).normal(size=q.shape)
  got = f(q, k, v, bias)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2, 3))(q, k, v, bias)
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    args = [as64(x) for x in (q, k, v, bias)]
    want = dense(*args)
    want_grads = jax.grad(lambda *a: jnp.sum(dense(*a) * cot), (0, 1, 2, 3))(*args)
  np.testing.assert_allclose(got, want, atol=3e-5)
  assert grads[3].shape == bias.shape
  for which, g, w in zip("qkvb", grads, want_grads):
    # No nan_to_num: a NaN gradient at a -inf or padded entry is the failure
    # the -inf-safe rule exists to prevent; the reference gives 0 there.
    assert np.isfinite(np.asarray(g)).all(), f"{which}: {(~np.isfinite(g)).sum()} not finite"
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, err_msg=which)


@pytest.mark.parametrize("target", ["interpret", "tpu_interpret"])
def test_gradients_of_some_inputs_and_outputs_match_float64(target):
  """The backward writes cotangents only for what is differentiated (a
  constant bias gets none; an unused output or log-sum-exp comes as a
  symbolic zero): what is asked for still matches float64. A constant bias
  (some of it -inf) with a loss on the output alone, then on the log-sum-exp
  alone; gradients wrt q, k and v; several blocks, GPU and TPU layouts."""
  q, k, v = _inputs(7, 70, 90, batch=2, heads=2, dim=8)
  rng = np.random.default_rng(8)
  bias = rng.normal(size=(1, 2, 70, 90))
  bias[..., 5] = -np.inf
  bias = jnp.asarray(bias, jnp.float32)
  f = lambda q, k, v: pallas_attention(q, k, v, bias, return_residual=True, block_q=32,
                                       block_k=32, target=target)

  def dense(q, k, v):                       # float64: out [b, t, n, d], lse [b, t, n]
    s = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(8) + jnp.asarray(bias, jnp.float64)
    lse = jax.scipy.special.logsumexp(s, axis=-1)
    out = jnp.einsum("bnts,bsnd->btnd", jnp.exp(s - lse[..., None]), v)
    return out, jnp.swapaxes(lse, 1, 2)

  cot_out = rng.normal(size=q.shape)
  cot_lse = rng.normal(size=q.shape[:3])
  losses = {"output": lambda out, lse: jnp.sum(out * cot_out),
            "log-sum-exp": lambda out, lse: jnp.sum(lse * cot_lse)}
  for name, loss in losses.items():
    got = jax.grad(lambda *a: loss(*f(*a)), (0, 1, 2))(q, k, v)
    with jax.enable_x64(True):
      args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
      want = jax.grad(lambda *a: loss(*dense(*a)), (0, 1, 2))(*args)
    for which, g, w in zip("qkv", got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4,
                                 err_msg=f"{name}: {which}")


EXPLICIT_MESH_CHECK = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from attention_lab import kernels
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(4, 40, 2, 8)), jnp.float32) for _ in range(3))
lengths = jnp.asarray([40, 7, 23, 1])
for types in (AxisType.Auto, AxisType.Explicit):
  mesh = jax.make_mesh((2,), ("data",), axis_types=(types,))
  with jax.set_mesh(mesh):
    rows = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    for kw in ({}, {"kv_lengths": lengths}):
      f = jax.jit(lambda q, k, v, kw=kw: kernels.dot_product_attention(
          q, k, v, implementation="pallas", interpret=True, is_causal=True, block_q=16,
          block_k=16, **kw))
      for inputs in ((rows(q), rows(k), rows(v)), (q, k, v)):   # sharded rows, replicated
        got = f(*inputs)
        keep = (np.arange(40)[None, :] <= np.arange(40)[:, None])[None, None]
        if kw:
          keep = keep & (np.arange(40)[None, None, None, :] < np.asarray(lengths)[:, None, None, None])
        s = np.einsum("bqhd,bkhd->bhqk", np.float64(q), np.float64(k)) / np.sqrt(8)
        s = np.where(keep, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), np.float64(v))
        print(types.name, bool(kw), float(np.abs(np.asarray(got) - want).max()))
"""


@pytest.mark.slow   # a fresh process with two CPU devices
def test_per_device_kernel_under_auto_and_explicit_mesh_axes():
  """Dispatch runs the Pallas kernel per device on a data mesh; with Explicit
  axis types shard_map takes inputs only laid out as its in_specs, so the
  lengths it makes (replicated) and replicated inputs are moved there first.
  Against float64 attention written out here, with and without lengths."""
  from conftest import run_on_devices
  out = run_on_devices(2, EXPLICIT_MESH_CHECK)
  lines = [line.split() for line in out.splitlines() if line.startswith(("Auto", "Explicit"))]
  assert len(lines) == 8, out
  assert all(float(err) < 2e-5 for _, _, err in lines), out
