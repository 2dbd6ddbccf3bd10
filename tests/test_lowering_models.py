"""Every experiment's real train and eval step, cross-lowered for TPU and GPU.

The steps are ``train/loop.py``'s own ``train_step`` / ``eval_step`` over a
state from ``jax.eval_shape`` (nothing is initialised or run) and a batch of
``jax.ShapeDtypeStruct``s shaped as the experiment's data pipeline makes it.
A change that breaks a step on an accelerator, or that silently swaps a fused
attention kernel for a materialised one, fails here on a CPU-only machine.

What each experiment gets is the table ``KERNELS`` below; the test asserts it
exactly, in both directions, so the table stays true.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import experiments
from attention_lab import models
from attention_lab.data import captions
from attention_lab.data import dates
from attention_lab.data import numbers
from attention_lab.data import spoken_sentences
from attention_lab.data.builders import moving_digits_offline
from attention_lab.data.synthetic_speech_commands import CLIP_SAMPLES
from attention_lab.kernels import dispatch
from attention_lab.kernels import lowering
from attention_lab.train import loop
from attention_lab.train import optim
from attention_lab.train import tasks
from conftest import override

# Even, so the batch splits over the 2-device mesh of the last tests.
BATCH = 4

# Widths and depths shrunk so each lowering takes seconds; heads, lengths,
# dropout rates, pooling and kernel pins stay as the experiment sets them,
# since those decide which kernel runs. One layer still has a backward pass.
TINY_MODEL = {"hidden_dim": 16, "num_layers": 1, "mlp_dim": 16, "embed_dim": 8,
              "attention_units": 8, "subsample_channels": 4, "widths": (4, 8),
              "blocks_per_stage": 1}
MAX_HEADS = 2

# What each step's attention runs on, per experiment: FUSED = a fused kernel
# (splash, or our Pallas kernel, through Mosaic on TPU; our Pallas kernel
# through Triton on GPU, where cuDNN would need half precision and a real
# cuDNN), a registry name = that materialised XLA kernel on both platforms,
# NONE = no dot-product attention at all. ``why`` says why a step is not fused.
FUSED, NONE = "fused", "none"
KERNELS = {
    # experiment: (train step, eval step, why)
    "cifar10_cnn_cbam": (NONE, NONE, "CNN: CBAM gates channels and positions with convolutions"),
    # Training applies attention dropout 0.2 (LRA's config): our Pallas kernel
    # on both accelerators (splash has no dropout).
    "cifar10_pixel_transformer": (FUSED, FUSED, ""),
    "cifar10_vit": (FUSED, FUSED, ""),
    "dates_bahdanau": (NONE, NONE, "RNN decoder, additive scores (layers.recurrent_attention), no kernel"),
    "dates_luong": (NONE, NONE, "RNN decoder, Luong general score (layers.recurrent_attention), no kernel"),
    # Token padding reaches attention as kv_lengths, which the fused kernels
    # take (a dense mask would send TPU and GPU to jax_nn).
    # Attention dropout 0.1 in training: our Pallas kernel, as above.
    "imdb_bytes_transformer": (FUSED, FUSED, ""),
    "listops_attention_pooling": (NONE, NONE, "GRU encoder, additive attention pooling"),
    "listops_lra_transformer": (FUSED, FUSED, ""),
    "listops_transformer": (FUSED, FUSED, ""),
    "mnist_cnn": (NONE, NONE, "CNN: CBAM gates channels and positions with convolutions"),
    "mnist_pixel_transformer": (FUSED, FUSED, ""),
    "mnist_vit": (FUSED, FUSED, ""),
    "numbers_bahdanau": (NONE, NONE, "RNN decoder, additive scores (layers.recurrent_attention), no kernel"),
    # Causal self-attention, cross-attention over kv_lengths, and in the eval
    # step the cached decoding step (one query over the cache's kv_lengths).
    "numbers_transformer": (FUSED, FUSED, ""),
    "mnist_captions_sat": (NONE, NONE, "LSTM decoder, additive scores over CNN regions (layers.recurrent_attention), no kernel"),
    "mnist_captions_transformer": (FUSED, FUSED, ""),
    "speech_commands_kwt": (FUSED, FUSED, ""),
    # The learned relative-position table of each block is a score_mod our
    # Pallas kernel reads per block offset (splash takes no score_mod).
    "speech_conformer": (FUSED, FUSED, ""),
    "speech_kwt": (FUSED, FUSED, ""),
    # As numbers_transformer, with the encoder over subsampled log-mel frames.
    "spoken_sentences_las": (FUSED, FUSED, ""),
    # Encoder self-attention over the 8x8 cells, decoder self-attention over
    # the 12 queries and cross-attention from them to the cells, no masks.
    "scenes_detr": (FUSED, FUSED, ""),
    # Self-attention across the 32 frames of a clip, no mask.
    "video_keyframes": (FUSED, FUSED, ""),
}

# The fused kernels' names in a lowered module: forward, and backward pieces.
FORWARD = {"splash": r"splash_\w+_fwd", "pallas": r"attention_lab_flash_forward"}
BACKWARD = {"splash": (r"splash_\w+_dkv", r"splash_\w+_dq"),
            "pallas": (r"attention_lab_flash_dkdv", r"attention_lab_flash_dq")}
FUSED_KERNELS = {"tpu": ("splash", "pallas"), "gpu": ("pallas",)}
PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}    # ours -> lower_for's


class MissingFusedKernel(AssertionError):
  """A step lowered, but without the kernel ``KERNELS`` says it gets."""


def tiny_config(name):
  config = experiments.get_config(name)
  model = config.model
  overrides = {f"model.{k}": v for k, v in TINY_MODEL.items() if k in model}
  if "num_heads" in model:
    overrides["model.num_heads"] = min(model.num_heads, MAX_HEADS)
  return override(config, **overrides)


def batch_spec(config, batch=BATCH):
  """The batch the experiment's pipeline makes (``attention_lab/data``), as
  shapes: ``inputs``, ``label``, and the eval step's ``weight``."""
  data = config.data.name.partition("/")[0]
  label = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if data in ("mnist", "mnist_offline", "cifar10"):
    side, channels = (28, 1) if data.startswith("mnist") else (32, 3)
    channels = 1 if config.data.grayscale else channels
    inputs = jax.ShapeDtypeStruct((batch, side, side, channels), jnp.float32)
  elif data in ("listops_offline", "imdb_reviews"):
    inputs = jax.ShapeDtypeStruct((batch, config.data.max_length), jnp.int32)
  elif data == "dates_offline":
    source = config.data.max_length or dates.MAX_SOURCE_LENGTH
    inputs = {"source": jax.ShapeDtypeStruct((batch, source), jnp.int32),
              "target": jax.ShapeDtypeStruct((batch, dates.TARGET_LENGTH), jnp.int32)}
    label = inputs["target"]
  elif data == "numbers_offline":
    source = config.data.max_length or numbers.MAX_SOURCE_LENGTH
    inputs = {"source": jax.ShapeDtypeStruct((batch, source), jnp.int32),
              "target": jax.ShapeDtypeStruct((batch, config.model.target_length), jnp.int32)}
    label = inputs["target"]
  elif data == "mnist_captions_offline":
    side = captions.CANVAS
    inputs = {"image": jax.ShapeDtypeStruct((batch, side, side, 1), jnp.float32),
              "target": jax.ShapeDtypeStruct((batch, config.model.target_length), jnp.int32)}
    label = inputs["target"]
  elif data == "spoken_sentences_offline":
    inputs = {"audio": jax.ShapeDtypeStruct((batch, spoken_sentences.CLIP_SAMPLES), jnp.int16),
              "target": jax.ShapeDtypeStruct((batch, config.model.target_length), jnp.int32)}
    label = inputs["target"]
  elif data in ("speech_commands", "speech_commands_offline"):
    inputs = jax.ShapeDtypeStruct((batch, CLIP_SAMPLES), jnp.int16)
  elif data == "digit_scenes_offline":
    side = config.data.image_size
    inputs = jax.ShapeDtypeStruct((batch, side, side, 1), jnp.float32)
    label = jax.ShapeDtypeStruct((batch, config.data.max_objects, 5), jnp.float32)
  elif data == "moving_digits_offline":
    settings = moving_digits_offline.SETTINGS
    inputs = jax.ShapeDtypeStruct((batch, settings.frames, settings.size, settings.size, 1),
                                  jnp.float32)
    label = jax.ShapeDtypeStruct((batch, settings.frames), jnp.int32)
  else:
    raise AssertionError(f"batch_spec does not know dataset {data!r}: add its batch shapes")
  return {"inputs": inputs, "label": label,
          "weight": jax.ShapeDtypeStruct((batch,), jnp.float32)}


def steps(config, batch):
  """``(train_step, eval_step, state shapes)`` as ``loop.Trainer`` builds them."""
  model = models.build(config.model)
  task = tasks.get(config.task)
  tx, schedule = optim.make_optimizer(config)
  init_key, dropout_key = loop._keys(config.seed)
  one = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((1,) + s.shape[1:], s.dtype),
                               batch["inputs"])

  def initial_state(example):
    initial = model.init({"params": init_key}, example, train=False)
    return loop.TrainState.create(
        apply_fn=model.apply, params=initial["params"], tx=tx,
        model_state={k: v for k, v in initial.items() if k not in loop._OUTPUT_COLLECTIONS})

  state = jax.eval_shape(initial_state, one)
  train = functools.partial(loop.train_step, model=model, task=task, config=config,
                            schedule=schedule, dropout_key=dropout_key)
  evaluate = functools.partial(loop.eval_step, model=model, task=task)
  return train, evaluate, state


@pytest.fixture
def chosen(monkeypatch):
  """``{platform: kernel names}`` dispatch picks while tracing: automatic
  choices (``select``) and pinned kernels (``check_supported``)."""
  record = {p: set() for p in ("cpu", "gpu", "tpu")}
  select, check = dispatch.select, dispatch.check_supported

  def spy_select(features, platform=None, *args, **kwargs):
    spec = select(features, platform, *args, **kwargs)
    record[platform].add(spec.name)
    return spec

  def spy_check(spec, *args, platform=None, **kwargs):
    # A kernel pinned on one platform is checked for that platform only; a
    # plain name (platform None) runs on all of them.
    for name in [platform] if platform in record else record:
      record[name].add(spec.name)
    return check(spec, *args, platform=platform, **kwargs)

  monkeypatch.setattr(dispatch, "select", spy_select)
  monkeypatch.setattr(dispatch, "check_supported", spy_check)
  return record


@pytest.fixture(autouse=True)
def matching_in_the_graph(monkeypatch):
  """The detection loss matches queries to objects on the host
  (``tasks.match_queries``: ``jax.pure_callback`` into scipy), which
  ``jax.export`` cannot serialise (a host callback needs a live backend).
  A fixed assignment, object ``j`` to query ``j``, stands in for it here, so
  the rest of the step (model, kernels, losses) lowers as it runs."""
  monkeypatch.setattr(tasks, "match_queries", lambda cost, valid: jnp.broadcast_to(
      jnp.arange(valid.shape[-1], dtype=jnp.int32), valid.shape))


fused_calls = lowering.called_kernels


def check_step(text, platform, step, expected, kernels):
  """Problems (strings) of one lowered step against ``KERNELS``; empty if none.

  ``kernels`` is what dispatch chose on ``platform`` while tracing it.
  """
  calls = fused_calls(text)
  where = f"{step} step on {platform}"
  if expected == NONE:
    return [f"{where}: expected no attention kernel, dispatch chose {sorted(kernels)}"
            ] if kernels else []
  if expected != FUSED:
    problems = []
    if kernels != {expected}:
      problems.append(f"{where}: expected {expected}, dispatch chose {sorted(kernels)}")
    if calls:
      problems.append(f"{where}: expected no fused kernel, module calls {calls}")
    return problems
  fused = [k for k in kernels if k in FUSED_KERNELS[platform]]
  if len(kernels) != 1 or not fused:
    return [f"{where}: expected a fused kernel ({'/'.join(FUSED_KERNELS[platform])}), "
            f"dispatch chose {sorted(kernels) or 'none'}; module calls {calls or 'none'}"]
  wanted = [FORWARD[fused[0]]] + (list(BACKWARD[fused[0]]) if step == "train" else [])
  missing = [w for w in wanted if not any(re.fullmatch(w + r"\w*", c) for c in calls)]
  call = lowering.FUSED_CALLS[PLATFORMS[platform]]
  if call not in lowering.custom_calls(text) or missing:
    return [f"{where}: {fused[0]} chosen but the module lacks {missing or call}"
            f"; it calls {calls or 'none'}"]
  return []


def lower_steps(name, chosen, platforms=("tpu", "gpu"), device_kind=lowering.TPU_KINDS[0]):
  """Lowers ``name``'s train and eval steps for ``platforms``; returns problems.

  Raises whatever lowering raises: a step that does not lower is an error, not
  a missing kernel.
  """
  config = tiny_config(name)
  batch = batch_spec(config)
  train, evaluate, state = steps(config, batch)
  train_batch = {k: v for k, v in batch.items() if k != "weight"}
  model_variables = loop.variables(state)
  expected = dict(zip(("train", "eval"), KERNELS[name][:2]))
  problems = []
  for step, fn, args in (("train", train, (state, train_batch)),
                         ("eval", evaluate, (model_variables, batch))):
    for names in chosen.values():
      names.clear()
    for platform in platforms:
      text = lowering.lower_for(fn, args, PLATFORMS[platform], device_kind)
      problems += check_step(text, platform, step, expected[step], set(chosen[platform]))
  return problems


def test_every_experiment_is_in_the_table():
  assert sorted(KERNELS) == experiments.names(), "classify the new experiment in KERNELS"


# Suite time: mnist_captions_transformer's steps are TransformerSeq2Seq's, as
# numbers_transformer's and spoken_sentences_las's are in the default suite.
_SLOW_LOWERING = {"mnist_captions_transformer"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_LOWERING else n for n in sorted(KERNELS)])
def test_train_and_eval_steps_lower_with_their_kernel(name, chosen):
  problems = lower_steps(name, chosen)
  if problems:
    raise MissingFusedKernel("\n".join(problems))


# The first kind is covered by every experiment above; one model family on the others.
@pytest.mark.parametrize("device_kind", lowering.TPU_KINDS[1:])
def test_vit_steps_lower_on_other_tpu_generations(device_kind, chosen):
  problems = lower_steps("mnist_vit", chosen, platforms=("tpu",), device_kind=device_kind)
  if problems:
    raise MissingFusedKernel("\n".join(problems))


def _lower_train_on_data_mesh(mesh):
  """mnist_vit's train step exported for TPU with the batch split over
  ``mesh``'s ``data`` axis, as ``loop.Trainer`` places it."""
  config = tiny_config("mnist_vit")
  batch = batch_spec(config)
  batch.pop("weight")
  train, _, state = steps(config, batch)
  with jax.sharding.use_abstract_mesh(mesh):
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    place = lambda tree, sharding: jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)
    exported = export.export(jax.jit(train), platforms=["tpu"])(
        place(state, replicated), place(batch, rows))
  assert exported.nr_devices == mesh.size
  return exported.mlir_module()


def _assert_splash_per_device(text):
  # dispatch wraps the kernel in a shard_map over the data axis (GSPMD cannot
  # split a Mosaic call); the manual computation is that shard_map.
  assert "sdy.manual_computation" in text
  calls = fused_calls(text)
  for pattern in (FORWARD["splash"],) + BACKWARD["splash"]:
    assert any(re.fullmatch(pattern + r"\w*", c) for c in calls), (pattern, calls)


def test_vit_train_step_on_a_two_device_data_mesh():
  mesh = lowering.tpu_mesh(devices=2).update(axis_types=(AxisType.Auto,))
  _assert_splash_per_device(_lower_train_on_data_mesh(mesh))


# The training loop's own mesh: axes (data, sequence), both automatic. Mosaic
# refuses a kernel under a shard_map that leaves any axis automatic, so
# dispatch's shard_map is manual over every axis.
def test_vit_train_step_on_the_training_loops_two_device_mesh():
  mesh = lowering.tpu_mesh(devices=2, axis_names=("data", "sequence")).update(
      axis_types=(AxisType.Auto,) * 2)
  _assert_splash_per_device(_lower_train_on_data_mesh(mesh))
