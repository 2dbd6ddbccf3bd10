"""The accelerator paths, checked from a CPU by cross-lowering.

``jax.export`` lowers for TPU (under an abstract mesh whose device is a TPU
generation, so Mosaic runs its TPU checks) and for CUDA. Each test asserts
that the intended fused kernel is what got lowered, not a silent fallback;
the numerics of the TPU programs are checked in Pallas's TPU interpreter.
What this cannot check without hardware: Mosaic's and Triton's compilation
after lowering, speed, and cuDNN (jax.nn needs a real cuDNN to trace it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_lab import kernels
from attention_lab.kernels import dispatch
from attention_lab.kernels import lowering
from attention_lab.kernels import masks
from attention_lab.kernels.pallas import pallas_attention
from attention_lab.kernels.splash import splash_attention

FORMS = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"local_window_size": (64, 16)},
    "kv_lengths": {"kv_lengths": "lengths"},
    "causal_kv_lengths": {"is_causal": True, "kv_lengths": "lengths"},
}


def _abstract(dtype, batch=2, length=256, heads=4, kv_heads=4, dim=64):
  q = jax.ShapeDtypeStruct((batch, length, heads, dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, dim), dtype)
  return q, kv, kv


def _attention(form, **extra):
  form = dict(form, **extra)
  lengths = form.pop("kv_lengths", None)

  def fn(q, k, v):
    kv_lengths = None if lengths is None else jnp.array([q.shape[1], 37])
    return kernels.dot_product_attention(q, k, v, kv_lengths=kv_lengths, **form)
  return fn


def _grad(fn):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_default_dispatch_lowers_splash_on_tpu(form, dtype):
  fn = _attention(form)
  text = lowering.lower_for(fn, _abstract(dtype), "tpu")
  assert "tpu_custom_call" in lowering.custom_calls(text)
  assert "splash" in lowering.kernel_names(text)
  grad_text = lowering.lower_for(_grad(fn), _abstract(dtype), "tpu")
  # Forward (with residuals), dq and dkv: three TPU kernels.
  assert grad_text.count("stablehlo.custom_call @tpu_custom_call") >= 3
  assert "splash" in lowering.kernel_names(grad_text)


@pytest.mark.parametrize("kind", lowering.TPU_KINDS)
def test_tpu_generations_and_grouped_heads(kind):
  fn = _attention({"is_causal": True})
  args = _abstract(jnp.bfloat16, heads=8, kv_heads=2)
  for f in (fn, _grad(fn)):
    text = lowering.lower_for(f, args, "tpu", device_kind=kind)
    assert "splash" in lowering.kernel_names(text), kind


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_our_pallas_kernel_lowers_on_tpu(form, dtype):
  """Odd head and value sizes (padded to the 128 lanes) and odd lengths."""
  fn = _attention(form, implementation="pallas")
  args = (jax.ShapeDtypeStruct((2, 200, 2, 40), dtype),
          jax.ShapeDtypeStruct((2, 200, 2, 40), dtype),
          jax.ShapeDtypeStruct((2, 200, 2, 24), dtype))
  text = lowering.lower_for(fn, args, "tpu")
  assert lowering.kernel_names(text) == {"attention_lab_flash_forward"}
  grad_text = lowering.lower_for(_grad(fn), args, "tpu")
  assert {"attention_lab_flash_dkdv", "attention_lab_flash_dq"} <= lowering.kernel_names(grad_text)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_default_dispatch_lowers_triton_on_gpu(form, dtype):
  fn = _attention(form)
  text = lowering.lower_for(fn, _abstract(dtype), "cuda")
  assert lowering.TRITON_CALL in lowering.custom_calls(text)
  assert "attention_lab_flash_forward" in lowering.kernel_names(text)
  grad_text = lowering.lower_for(_grad(fn), _abstract(dtype), "cuda")
  assert {"attention_lab_flash_dkdv", "attention_lab_flash_dq"} <= lowering.kernel_names(grad_text)


def test_what_no_fused_kernel_expresses_lowers_through_xla(monkeypatch):
  """A dense boolean mask goes to jax.nn's XLA formulation on both accelerators."""
  chosen = {}
  select = dispatch.select

  def spy(features, platform=None, *args, **kwargs):
    spec = select(features, platform, *args, **kwargs)
    chosen[platform] = spec.name
    return spec

  monkeypatch.setattr(dispatch, "select", spy)
  mask = jnp.tril(jnp.ones((256, 256), bool))[None] & (jnp.arange(256) % 3 > 0)
  fn = lambda q, k, v: kernels.dot_product_attention(q, k, v, mask=mask)
  for platform in ("tpu", "cuda"):
    text = lowering.lower_for(fn, _abstract(jnp.float32), platform)
    assert not lowering.custom_calls(text), platform
  assert chosen["tpu"] == chosen["gpu"] == "jax_nn", chosen


@pytest.mark.parametrize("bias_shape", [(1, 4, 256, 256), (2, 1, 256, 256)],
                         ids=["shared_over_batch", "per_sequence"])
def test_a_dense_bias_lowers_our_pallas_kernel_with_its_gradient(bias_shape):
  """An additive bias (a learned relative-position table, ALiBi as a table) is
  read block by block by our Pallas kernel: Mosaic on TPU, Triton on GPU; the
  bias's own gradient comes out of the dK/dV kernel."""
  def fn(q, k, v, bias):
    return jnp.sum(kernels.dot_product_attention(q, k, v, bias=bias).astype(jnp.float32))
  args = _abstract(jnp.float32) + (jax.ShapeDtypeStruct(bias_shape, jnp.float32),)
  grad = jax.grad(fn, (0, 1, 2, 3))
  names = lowering.kernel_names(lowering.lower_for(grad, args, "tpu"))
  assert {"attention_lab_flash_forward", "attention_lab_flash_dkdv",
          "attention_lab_flash_dq"} <= set(names), names
  assert lowering.TRITON_CALL in lowering.custom_calls(lowering.lower_for(grad, args, "cuda"))


def test_the_backward_writes_only_the_gradients_asked_for():
  """A bias or a relative-position table that is not differentiated (a fixed
  table, a padding bias) costs the backward no writes: the dK/dV kernel
  writes the bias's ``[b, n, q, kv]`` float32 gradient, and the dQ kernel
  the table's per-block tiles, only when the caller differentiates them."""
  from attention_lab.kernels import mods

  def with_bias(q, k, v, bias):
    return jnp.sum(kernels.dot_product_attention(q, k, v, bias=bias))

  def with_table(q, k, v, table):
    return jnp.sum(kernels.dot_product_attention(
        q, k, v, score_mod=mods.relative_bias(table, 32)))

  qkv = _abstract(jnp.float32)             # [2, 256, 4, 64]
  cases = [(with_bias, jax.ShapeDtypeStruct((1, 4, 256, 256), jnp.float32), {
      "tpu": ("attention_lab_flash_dkdv", ["2x4x256x256xf32"]),
      "cuda": ("attention_lab_flash_dkdv", ["2x4x256x256xf32"])}),
           (with_table, jax.ShapeDtypeStruct((4, 65), jnp.float32), {
      # [b, n, query blocks, key blocks, block_q, block_k]: 128-wide on
      # TPU, the GPU's 64-wide blocks on CUDA.
      "tpu": ("attention_lab_flash_dq", ["2x4x2x2x128x128xf32"]),
      "cuda": ("attention_lab_flash_dq", ["2x4x4x4x64x64xf32"])})]
  for fn, extra, expected in cases:
    for platform, (kernel, extra_results) in expected.items():
      d = "128" if platform == "tpu" else "64"        # head dims padded to TPU lanes
      own = ["2x4x256x%sxf32" % d] * (2 if kernel.endswith("dkdv") else 1)
      for argnums, want in (((0, 1, 2), own), ((0, 1, 2, 3), own + extra_results)):
        text = lowering.lower_for(jax.grad(fn, argnums), qkv + (extra,), platform)
        assert lowering.kernel_results(text, kernel) == [want], (fn.__name__, platform,
                                                                 argnums)


def test_one_jitted_function_carries_each_platforms_kernel():
  """The choice follows the platform being lowered, not the default backend."""
  step = jax.jit(_grad(_attention({"is_causal": True})))
  args = _abstract(jnp.float32)
  cpu_text = step.trace(*args).lower().as_text()
  assert "tpu_custom_call" not in cpu_text and "triton" not in cpu_text
  assert "splash" in lowering.kernel_names(lowering.lower_for(step, args, "tpu"))
  assert lowering.TRITON_CALL in lowering.custom_calls(lowering.lower_for(step, args, "cuda"))


def test_named_kernel_is_checked_against_the_lowering_platform():
  q, k, v = _abstract(jnp.float32)
  with pytest.raises(ValueError, match=r"'splash' does not run on 'cpu'"):
    jax.eval_shape(lambda q, k, v: kernels.dot_product_attention(
        q, k, v, implementation="splash"), q, k, v)
  fn = lambda q, k, v: kernels.dot_product_attention(q, k, v, implementation="splash")
  assert "splash" in lowering.kernel_names(lowering.lower_for(fn, (q, k, v), "tpu"))


def test_residual_lowers_our_pallas_kernel_on_both_accelerators():
  """``return_residual`` (splash has no differentiable one) goes to our Pallas
  kernel: Mosaic on TPU, Triton on GPU, forward and the gradient through it."""
  def fn(q, k, v):
    out, lse = kernels.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
  args = _abstract(jnp.bfloat16)
  for f in (fn, jax.grad(fn, (0, 1, 2))):
    text = lowering.lower_for(f, args, "tpu")
    assert "attention_lab_flash_forward" in lowering.kernel_names(text)
    assert "splash" not in " ".join(lowering.kernel_names(text))
    assert lowering.TRITON_CALL in lowering.custom_calls(lowering.lower_for(f, args, "cuda"))
  assert "attention_lab_flash_dq" in lowering.kernel_names(
      lowering.lower_for(jax.grad(fn, (0, 1, 2)), args, "tpu"))


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "per_head"])
def test_attention_dropout_lowers_our_pallas_kernel_on_both_accelerators(broadcast):
  """Training with attention dropout (splash has none) runs our Pallas kernel
  with its hashed dropout mask: Mosaic on TPU, Triton on GPU, with gradients."""
  def fn(q, k, v):
    out = kernels.dot_product_attention(
        q, k, v, is_causal=True, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0),
        broadcast_dropout=broadcast)
    return jnp.sum(out.astype(jnp.float32))
  args = _abstract(jnp.bfloat16)
  grad = jax.grad(fn, (0, 1, 2))
  names = lowering.kernel_names(lowering.lower_for(grad, args, "tpu"))
  assert {"attention_lab_flash_forward", "attention_lab_flash_dkdv",
          "attention_lab_flash_dq"} <= set(names), names
  assert lowering.TRITON_CALL in lowering.custom_calls(lowering.lower_for(grad, args, "cuda"))


def test_a_kernel_pinned_on_cpu_leaves_the_accelerators_automatic():
  """``implementation="cpu=reference"`` (an experiment's CPU tuning) runs the
  reference kernel on CPU and still lowers the fused kernels elsewhere."""
  fn = _attention({"is_causal": True}, implementation="cpu=reference")
  args = _abstract(jnp.float32, batch=1, length=1024)   # automatic on CPU: blockwise
  cpu_text = jax.jit(fn).trace(*args).lower().as_text()
  assert "tpu_custom_call" not in cpu_text and "stablehlo.while" not in cpu_text
  assert "splash" in lowering.kernel_names(lowering.lower_for(fn, args, "tpu"))
  assert lowering.TRITON_CALL in lowering.custom_calls(lowering.lower_for(fn, args, "cuda"))
  pinned = _attention({"is_causal": True}, implementation="cpu=reference,tpu=jax_nn")
  assert not lowering.custom_calls(lowering.lower_for(pinned, args, "tpu"))


@pytest.mark.parametrize("choice, message", [
    ("cpu=nope", r"unknown attention kernel 'nope'"),
    ("mps=reference", r"unknown platform 'mps'"),
    ("cpu=splash", r"kernel 'splash' does not run on 'cpu'"),
    ("cpu=reference,cpu=jax_nn", r"platform 'cpu' named twice"),
    ("cpu:reference", r"unknown attention kernel 'cpu:reference'"),
    ("cpu=", r"platform=kernel pairs"),
])
def test_bad_kernel_choices_name_the_problem(choice, message):
  with pytest.raises(ValueError, match=message):
    kernels.attention_fn(choice)


def _reference64(q, k, v, mask, **form):
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    return np.asarray(kernels.reference_attention(as64(q), as64(k), as64(v), mask=mask, **form))


@pytest.mark.parametrize("name", ["splash", "pallas_tpu_layout"])
@pytest.mark.parametrize("form", [{"is_causal": True}, {"local_window_size": (20, 8)}],
                         ids=["causal", "window"])
def test_tpu_programs_match_float64_in_the_tpu_interpreter(name, form):
  """Grouped heads, padded keys, rows left with no key by the window."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 150, 4, 32)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 150, 2, 32)), jnp.float32) for _ in range(2))
  lengths = jnp.array([150, 37])
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  if name == "splash":
    fn = lambda q, k, v: splash_attention(q, k, v, kv_lengths=lengths, interpret=True, **form)
  else:
    fn = lambda q, k, v: pallas_attention(q, k, v, kv_lengths=lengths, target="tpu_interpret",
                                          **form)
  dense = masks.key_padding_mask(lengths, 150)
  np.testing.assert_allclose(fn(q, k, v), _reference64(q, k, v, dense, **form),
                             rtol=2e-5, atol=2e-5)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) * cot), (0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want = jax.grad(lambda *a: jnp.sum(kernels.reference_attention(*a, mask=dense, **form)
                                       * as64(cot)), (0, 1, 2))(as64(q), as64(k), as64(v))
    want = [np.asarray(w) for w in want]
  for got, w in zip(grads, want):
    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mods_form", ["alibi_learned_documents", "softcap_prefix_bf16"])
def test_score_mods_lower_our_pallas_kernel_with_their_gradients(mods_form):
  """A score_mod (and a mask_mod reading traced document ids) runs fused in
  our Pallas kernel on both accelerators (splash takes no score_mod): the
  forward and both backward kernels are in the module, also for the gradient
  of the learned ALiBi slopes; the values per head, query row and key column
  are inputs of the kernels, not a fallback to blockwise."""
  from attention_lab.kernels import mods
  dtype = jnp.float32 if mods_form == "alibi_learned_documents" else jnp.bfloat16

  def fn(q, k, v, slopes, ids):
    if mods_form == "alibi_learned_documents":
      kw = dict(score_mod=mods.alibi(slopes), mask_mod=mods.document(ids), is_causal=True)
    else:                  # a static mask_mod: its block mask skips empty blocks
      kw = dict(score_mod=mods.softcap(30.0), mask_mod=mods.prefix_lm(np.array([100, 0])))
    return jnp.sum(kernels.dot_product_attention(q, k, v, **kw).astype(jnp.float32))

  args = _abstract(dtype) + (jax.ShapeDtypeStruct((4,), jnp.float32),
                             jax.ShapeDtypeStruct((2, 256), jnp.int32))
  grad = jax.grad(fn, (0, 1, 2, 3))
  for platform, names in lowering.fused_kernels(grad, args).items():
    assert lowering.FLASH_KERNELS <= names, (platform, names)


def test_pallas_blocks_that_overflow_a_tpu_cores_vmem_send_dispatch_elsewhere(caplog,
                                                                              monkeypatch):
  """The dK/dV kernel holds Q, dO and the two row statistics for the whole
  sequence, double-buffered; at 4,096 bfloat16 tokens with a bias (head dims
  padded to 128 lanes, 128-row blocks) that is, written out:"""
  from attention_lab.kernels import checks
  from attention_lab.kernels import pallas
  mib = 2 ** 20
  q_and_do = 2 * 4096 * 128 * 2                     # bfloat16
  statistics = 2 * 4096 * 128 * 4                   # lse and delta, float32 x 128 lanes
  k_v_dk_dv = 4 * 128 * 128 * 2
  bias_and_grad = 2 * 4096 * 128 * 4
  want = 2 * (q_and_do + statistics + k_v_dk_dv + bias_and_grad)
  long = checks.AttentionShape((2,), 4096, 4096, 4, 4, 64, 64)
  assert pallas.tpu_vmem_bytes(long, jnp.bfloat16, bias=True) == want == 20.25 * mib
  assert pallas.tpu_vmem_bytes(long, jnp.bfloat16, bias=False) == want - 2 * bias_and_grad
  # A relative-position table read per block offset: 16 x 16 blocks of 128
  # at 2,048 tokens have 31 offsets, one float32 tile each, in every kernel.
  mid = checks.AttentionShape((2,), 2048, 2048, 4, 4, 64, 64)
  relative = kernels.mods.relative_bias(jnp.zeros((4, 65)), 32)
  assert (pallas.tpu_vmem_bytes(mid, jnp.bfloat16, False, score_mod=relative)
          - pallas.tpu_vmem_bytes(mid, jnp.bfloat16, False)) == 2 * 31 * 128 * 128 * 4

  bias, bf16 = frozenset({"bias"}), jnp.dtype(jnp.bfloat16)
  monkeypatch.setattr(dispatch, "_LOGGED_CHOICES", set())      # log this choice afresh
  assert kernels.select(bias, "tpu", bf16,
                        checks.AttentionShape((2,), 2048, 2048, 4, 4, 64, 64)).name == "pallas"
  with caplog.at_level("INFO"):
    assert kernels.select(bias, "tpu", bf16, long).name == "jax_nn"
  assert any("pallas (its whole-sequence blocks would take 20 MiB of VMEM at 4096 tokens"
             in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
  assert kernels.select(bias, "gpu", bf16, long).name == "pallas"    # Triton: no VMEM
  # Named, it runs as asked (and lowers: only Mosaic's compile on a chip would object).
  text = lowering.lower_for(
      lambda q, k, v, b: kernels.dot_product_attention(q, k, v, bias=b, implementation="pallas"),
      (jax.ShapeDtypeStruct((1, 4096, 1, 64), jnp.bfloat16),) * 3
      + (jax.ShapeDtypeStruct((1, 1, 4096, 4096), jnp.bfloat16),), "tpu")
  assert "attention_lab_flash_forward" in lowering.kernel_names(text)
