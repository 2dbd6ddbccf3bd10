"""Bad and odd input, fuzzed with hypothesis: any shapes (lengths of zero and
one included), dtypes, mask shapes, dtypes and values (all keys masked), bias
shapes, causal or not. Every call either returns the float64 answer (finite,
zeros for rows with nothing to attend) or raises a ValueError that names the
offending array; never NaN, never a silently wrong broadcast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from attention_lab import kernels
from attention_lab.layers import AttentionConfig
from attention_lab.layers import SelfAttention

# The kernels that run natively on CPU (Pallas is fuzzed only through its
# fixed cases in test_pallas.py: its interpreter is too slow for hundreds).
CPU_KERNELS = ("reference", "jax_nn", "blockwise")
# Fuzzed in the default suite: the fused CPU kernel; the materialised ones
# (checked case by case in test_kernels.py) with -m slow.
FUZZED_KERNELS = [pytest.param(k, marks=pytest.mark.slow) if k != "blockwise" else k
                  for k in CPU_KERNELS]
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _broadcastable_shape(draw, target):
  """A shape that broadcasts to ``target``: each dim kept or 1, leading dims maybe dropped."""
  shape = [draw(st.sampled_from([1, n])) for n in target]
  drop = draw(st.integers(0, len(target) - 2))
  return tuple(shape[drop:])


def _broken_shape(draw, target):
  """A shape that does not broadcast to ``target`` (a dim off by one, or too many dims)."""
  if draw(st.booleans()):
    return (2,) + tuple(target)                       # an extra leading dim of 2
  shape = list(target)
  i = draw(st.integers(0, len(target) - 1))
  shape[i] = 2 if target[i] in (0, 1) else target[i] + 1   # neither 1 nor the size
  return tuple(shape)


@st.composite
def attention_case(draw, min_length=0, max_length=6):
  batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
  q_len = draw(st.integers(min_length, max_length))
  kv_len = draw(st.integers(min_length, max_length))
  kv_heads = draw(st.sampled_from([1, 2]))
  heads = kv_heads * draw(st.sampled_from([1, 2]))
  head_dim, value_dim = draw(st.integers(1, 6)), draw(st.integers(1, 6))
  dtype = draw(st.sampled_from(["float32", "bfloat16"]))
  scores = batch + (heads, q_len, kv_len)
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  case = {
      "query": rng.normal(size=batch + (q_len, heads, head_dim)),
      "key": rng.normal(size=batch + (kv_len, kv_heads, head_dim)),
      "value": rng.normal(size=batch + (kv_len, kv_heads, value_dim)),
      "dtype": dtype, "is_causal": draw(st.booleans()), "mask": None, "bias": None,
      "broken": None,
  }
  mask_kind = draw(st.sampled_from(["none", "random", "none_valid", "int", "broken"]))
  if mask_kind != "none":
    if mask_kind == "broken":
      shape = _broken_shape(draw, scores)
      case["broken"] = "mask"
    else:
      shape = _broadcastable_shape(draw, scores)
    if mask_kind == "none_valid":
      case["mask"] = np.zeros(shape, bool)                  # every key masked
    elif mask_kind == "int":
      case["mask"] = rng.integers(0, 2, shape).astype(np.int32)   # Flax-style 0/1
    else:
      case["mask"] = rng.random(shape) < 0.6
  bias_kind = draw(st.sampled_from(["none", "valid", "broken"]))
  if bias_kind == "valid":
    case["bias"] = rng.normal(size=_broadcastable_shape(draw, scores))
  elif bias_kind == "broken" and case["broken"] is None:
    case["bias"] = rng.normal(size=_broken_shape(draw, scores))
    case["broken"] = "bias"
  return case


def _float64_answer(case, q, k, v, bias):
  """Attention in numpy float64 from the rounded inputs, with explicit
  broadcasting and grouped heads; rows with no key to attend are zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  heads, kv_heads = q.shape[-2], k.shape[-2]
  k = np.repeat(k, heads // kv_heads, axis=-2)
  v = np.repeat(v, heads // kv_heads, axis=-2)
  scores = np.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(q.shape[-1])
  allowed = np.ones(scores.shape, bool)
  if case["mask"] is not None:
    allowed &= np.broadcast_to(np.asarray(case["mask"]) != 0, scores.shape)
  if bias is not None:
    scores = scores + np.broadcast_to(np.asarray(bias, np.float64), scores.shape)
  if case["is_causal"]:
    q_len, kv_len = scores.shape[-2:]
    allowed &= np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None]
  scores = np.where(allowed, scores, -np.inf)
  top = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
  top = np.where(np.isfinite(top), top, 0.0)
  weights = np.where(allowed, np.exp(scores - top), 0.0)
  total = weights.sum(-1, keepdims=True)
  weights = weights / np.where(total > 0, total, 1.0)
  return np.einsum("...hqk,...khd->...qhd", weights, v)


@pytest.mark.parametrize("kernel", FUZZED_KERNELS)
@FUZZ
@given(case=attention_case())
def test_kernel_is_right_or_names_the_problem(kernel, case):
  _right_or_named(case, implementation=kernel)


def _right_or_named(case, **kernel_args):
  """The call on ``case`` returns the float64 answer, or (for a broken case
  only) raises a ValueError naming the array that does not broadcast."""
  dtype = jnp.dtype(case["dtype"])
  q, k, v = (jnp.asarray(case[n], dtype) for n in ("query", "key", "value"))
  bias = None if case["bias"] is None else jnp.asarray(case["bias"], dtype)
  mask = None if case["mask"] is None else jnp.asarray(case["mask"])
  try:
    out = kernels.dot_product_attention(q, k, v, bias, mask, is_causal=case["is_causal"],
                                        **kernel_args)
  except ValueError as e:
    assert case["broken"] is not None, f"valid input refused: {e}"
    assert case["broken"] in str(e) and "broadcast" in str(e), str(e)
    return
  assert case["broken"] is None, f"{case['broken']} of a wrong shape was accepted"
  out = np.asarray(out.astype(jnp.float32))
  assert out.shape == q.shape[:-1] + (v.shape[-1],)
  assert np.all(np.isfinite(out))
  want = _float64_answer(case, q.astype(jnp.float32), k.astype(jnp.float32),
                         v.astype(jnp.float32),
                         None if bias is None else bias.astype(jnp.float32))
  tol = TOLERANCE[case["dtype"]]
  np.testing.assert_allclose(out, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max(
      initial=0.0)))


# blockwise over several blocks: 8 x 16 blocks and lengths up to 40 (5 query
# and 3 key blocks), so that skipped, partly masked and padded blocks, the
# masks' block tables and the lengths' loop bounds all run. At the default
# blocks every length above is a single block.
MULTI_BLOCK = settings(FUZZ, max_examples=25)


@MULTI_BLOCK
@given(case=attention_case(min_length=1, max_length=40))
def test_blockwise_over_several_blocks_is_right_or_names_the_problem(case):
  _right_or_named(case, implementation="blockwise", block_q=8, block_k=16)


@st.composite
def broken_core_case(draw):
  """Query/key/value that break the contract in one named way."""
  fault = draw(st.sampled_from(["heads", "head_dim", "kv_length", "dtype", "rank", "batch"]))
  q_len, kv_len = draw(st.integers(1, 5)), draw(st.integers(1, 5))
  shapes = {"query": [2, q_len, 4, 8], "key": [2, kv_len, 2, 8], "value": [2, kv_len, 2, 8]}
  dtype = {"query": "float32", "key": "float32", "value": "float32"}
  if fault == "heads":
    shapes["key"][2] = shapes["value"][2] = 3           # 4 query heads over 3 kv heads
    expect = "multiple of key/value heads"
  elif fault == "head_dim":
    shapes["key"][3] = 7
    expect = "head_dim differ"
  elif fault == "kv_length":
    shapes["value"][1] = kv_len + 1
    expect = "lengths differ"
  elif fault == "dtype":
    dtype[draw(st.sampled_from(["query", "key", "value"]))] = "int32"
    expect = "floating point"
  elif fault == "rank":
    shapes["query"] = shapes["query"][1:]
    expect = "same rank"
  else:
    shapes["key"][0] = shapes["value"][0] = 3
    expect = "batch dimensions differ"
  return shapes, dtype, expect


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@FUZZ
@given(case=broken_core_case())
def test_broken_contract_is_named(kernel, case):
  shapes, dtype, expect = case
  arrays = [jnp.ones(shapes[n], dtype[n]) for n in ("query", "key", "value")]
  with pytest.raises(ValueError, match=expect):
    kernels.dot_product_attention(*arrays, implementation=kernel)


# Output tolerance relative to max|want|. The float64 answer is taken from
# the inputs as rounded to the dtype, so what is left is the kernel's own
# rounding: float32 logits of ~3e3 (ulp 2.4e-4), then the output's (2^-11
# float16, 2^-8 bfloat16). Measured, all three CPU kernels: 1.3e-5 (float32),
# 1.6e-4 (float16), 1.9e-3 (bfloat16).
HUGE_SCORE_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_float_masks_and_huge_scores(dtype):
  """Flax-style float 0/1 masks mean "attend where nonzero"; scores of ~3e3
  (exp overflows float16 and float32 without the max subtracted) give the
  float64 softmax over the mask written out here. Keys near one shared
  direction make the scores huge but only a few units apart, so the weights
  stay soft (top weights 0.52-0.996 in rows with two keys or more): a kernel
  that loses the softmax's precision, or only finds the top key, fails. One
  query row sees no key: zeros."""
  rng = np.random.default_rng(0)
  shared = rng.normal(size=(1, 1, 2, 8)) * 30.0
  q = jnp.asarray(shared + rng.normal(size=(1, 4, 2, 8)) * 0.05, dtype)
  k = jnp.asarray(shared + rng.normal(size=(1, 4, 2, 8)) * 0.05, dtype)
  v = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), dtype)
  allowed = rng.random((1, 1, 4, 4)) < 0.5
  allowed[..., 3, :] = False                            # a query with no key
  mask = jnp.asarray(allowed, jnp.float32)

  q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
  scores = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(8)
  assert np.abs(scores).max() > 2e3
  visible = np.broadcast_to(allowed, scores.shape)
  weights = np.zeros_like(scores)
  for index in np.ndindex(*scores.shape[:-1]):
    seen = visible[index]
    if seen.any():
      e = np.exp(scores[index][seen] - scores[index][seen].max())
      weights[index][seen] = e / e.sum()
  several = visible.sum(-1) >= 2                        # rows with a choice of keys
  top = weights.max(-1)[several]
  assert top.size and top.max() < 0.999 and top.min() < 0.7
  want = np.einsum("bhqk,bkhd->bqhd", weights, v64)
  tol = HUGE_SCORE_TOLERANCE[dtype] * np.abs(want).max()
  for kernel in CPU_KERNELS:
    out = kernels.dot_product_attention(q, k, v, mask=mask, implementation=kernel)
    assert out.dtype == jnp.dtype(dtype), kernel
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), kernel
    np.testing.assert_array_equal(out[:, 3], 0.0, err_msg=kernel)
    np.testing.assert_allclose(out, want, rtol=0, atol=tol, err_msg=kernel)


def test_zero_length_with_weights_requested():
  q = jnp.ones((2, 0, 2, 4))
  k = jnp.ones((2, 3, 2, 4))
  out, weights = kernels.dot_product_attention(q, k, k, implementation="reference",
                                               return_weights=True)
  assert out.shape == (2, 0, 2, 4) and weights.shape == (2, 2, 0, 3)


@settings(FUZZ, max_examples=15)    # each example compiles the layer afresh
@given(batch=st.integers(1, 3), length=st.integers(0, 5), features=st.sampled_from([4, 8]),
       heads=st.sampled_from([1, 2]), lengths_seed=st.integers(0, 1000))
@example(batch=3, length=5, features=8, heads=2, lengths_seed=3)   # key lengths [0, 4, 5]
def test_self_attention_layer_with_padding_and_empty_rows(batch, length, features, heads,
                                                          lengths_seed):
  """The Flax layer over padded batches: rows with every key padded give
  zeros through the kernel (the output projection's bias alone), the output
  is finite and the padding of one example never changes another."""
  rng = np.random.default_rng(lengths_seed)
  x = jnp.asarray(rng.normal(size=(batch, length, features)), jnp.float32)
  valid = np.arange(length)[None, :] < rng.integers(0, length + 1, batch)[:, None]
  mask = jnp.asarray(valid[:, None, None, :])
  layer = SelfAttention(num_heads=heads, attention=AttentionConfig(kernel="blockwise"))
  params = layer.init(jax.random.key(0), x, mask=mask)
  # A nonzero output bias (it starts at zero), so that an empty row's output,
  # the bias alone, differs from both zeros and a projection of the values.
  out_bias = rng.normal(size=(features,)).astype(np.float32)
  params = {"params": {**params["params"], "out": {**params["params"]["out"],
                                                   "bias": jnp.asarray(out_bias)}}}
  out = np.asarray(layer.apply(params, x, mask=mask))
  assert out.shape == x.shape and np.all(np.isfinite(out))
  for b in range(batch):
    alone = np.asarray(layer.apply(params, x[b:b + 1], mask=mask[b:b + 1]))
    np.testing.assert_allclose(out[b:b + 1], alone, rtol=1e-5, atol=1e-6)
    if not valid[b].any():            # no key to attend: a zero context, projected
      np.testing.assert_allclose(out[b], np.broadcast_to(out_bias, out[b].shape),
                                 rtol=1e-6, atol=1e-6)


def test_self_attention_layer_names_a_mask_of_the_wrong_shape():
  layer = SelfAttention(num_heads=2, attention=AttentionConfig(kernel="reference"))
  x = jnp.ones((2, 5, 8))
  params = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"mask shape \(2, 1, 1, 4\) does not broadcast"):
    layer.apply(params, x, mask=jnp.ones((2, 1, 1, 4), bool))
