"""The one training loop: every task trains and evaluates through here.

Determinism: the batch of step ``s`` is a pure function of ``(config.seed, s)``
and the dropout key of step ``s`` is ``fold_in(key(seed), s)``, so a run that
is stopped and resumed from a checkpoint ends with exactly the parameters of an
uninterrupted run. Two things run beside the device step without changing
that: the next ``config.data.prefetch`` batches are built on a thread (the
same pure function, called early), and with ``config.async_checkpoints`` a
checkpoint is written by orbax's thread while training goes on (it counts as
saved only once renamed into place; the loop waits for it before the final
evaluation and before returning).
"""

from __future__ import annotations

import functools
import json
import os
import socket
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct
from flax.training import train_state

from attention_lab import data as data_lib
from attention_lab import models
from attention_lab.data import pipeline
from attention_lab.train import checkpoint as checkpoint_lib
from attention_lab.train import optim
from attention_lab.train import preemption
from attention_lab.train import progress as progress_lib
from attention_lab.train import sharding
from attention_lab.train import tasks as tasks_lib
from attention_lab.train import validation
from attention_lab.viz import curves
from attention_lab.viz import drawers
from attention_lab.viz import index


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, params, opt_state) plus the model's other
  variable collections (``batch_stats`` of BatchNorm; empty for most models),
  which are updated by the forward pass rather than by gradients."""
  model_state: Any = struct.field(default_factory=dict)


# Variable collections that are outputs for pictures, never state to keep.
_OUTPUT_COLLECTIONS = ("params", "intermediates")


def variables(state) -> Dict[str, Any]:
  """``{"params": ..., **model_state}``: what ``model.apply`` needs."""
  return {"params": state.params, **state.model_state}


def _keys(seed: int):
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  return init_key, dropout_key


def train_step(state: TrainState, batch, *, model, task, config, schedule,
               dropout_key):
  """One optimiser step. Returns the new state and scalar metrics."""
  step_key = jax.random.fold_in(dropout_key, state.step)

  mutable = list(state.model_state)

  def loss_fn(params):
    outputs = model.apply({"params": params, **state.model_state}, batch["inputs"],
                          train=True, rngs={"dropout": step_key},
                          mutable=mutable or False)
    outputs, model_state = outputs if mutable else (outputs, state.model_state)
    loss, metrics = task.train_loss(outputs, batch, config)
    return loss, (metrics, model_state)

  (_, (metrics, model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, model_state=model_state)
  # The parameters' norm makes an update that overflows them visible to the
  # loop's finiteness check even when the loss and gradients were finite.
  metrics = dict(metrics, grad_norm=_global_norm(grads),
                 param_norm=_global_norm(new_state.params),
                 learning_rate=schedule(state.step))
  return new_state, metrics


def eval_step(model_variables, batch, *, model, task, with_predictions: bool = False):
  """Weighted metric sums over one evaluation batch; with ``with_predictions``
  ``(sums, task.predict(outputs))``, for metrics of the whole split
  (``Task.corpus_metrics``)."""
  outputs = model.apply(model_variables, batch["inputs"], train=False)
  sums = task.eval_sums(outputs, batch)
  sums["count"] = batch["weight"].sum()
  return (sums, task.predict(outputs)) if with_predictions else sums


def _first(inputs, n: int):
  """The first ``n`` examples of model inputs (an array or a dict of them)."""
  return jax.tree_util.tree_map(lambda x: x[:n], inputs)


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


class Trainer:
  """Model, data, task and jitted steps built from one config: what the loop
  below drives (an experiment, in ``experiments/``, is only the config).

  Both ``train_and_evaluate`` and the ``eval`` and ``visualize`` modes use it,
  so a checkpoint is always read back into exactly the structure that wrote it.
  """

  def __init__(self, config):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, self.mesh)
    self.eval_batch_size = sharding.round_up_to_devices(config.eval_batch_size, self.mesh)
    self.task = tasks_lib.get(config.task)
    self.data = data_lib.build(config)
    self.model = models.build(config.model)
    self.tx, self.schedule = optim.make_optimizer(config)
    init_key, self.dropout_key = _keys(config.seed)
    example = _first(self.data.train(0)["inputs"], 1)
    with jax.set_mesh(self.mesh):
      initial = jax.jit(lambda k, x: self.model.init({"params": k}, x, train=False))(
          init_key, example)
    state = TrainState.create(
        apply_fn=self.model.apply, params=initial["params"], tx=self.tx,
        model_state={k: v for k, v in initial.items() if k not in _OUTPUT_COLLECTIONS})
    self.state_sharding = sharding.param_sharding(state, self.mesh, config.mesh.shard_params)
    self.initial_state = jax.device_put(state, self.state_sharding)
    replicated = sharding.replicated(self.mesh)
    # The un-jitted step, for tools that lower it themselves
    # (benchmarks/train.py counts its FLOPs); training calls train_step.
    self.train_step_fn = functools.partial(
        train_step, model=self.model, task=self.task, config=config,
        schedule=self.schedule, dropout_key=self.dropout_key)
    self.train_step = self._under_mesh(jax.jit(
        self.train_step_fn, out_shardings=(self.state_sharding, replicated),
        donate_argnums=0))
    self.eval_step = self._under_mesh(jax.jit(
        functools.partial(eval_step, model=self.model, task=self.task,
                          with_predictions=self.task.corpus_metrics is not None),
        out_shardings=replicated))
    self.apply_for_pictures = self._under_mesh(jax.jit(
        lambda v, x: self.model.apply(v, x, train=False, mutable=["intermediates"]),
        out_shardings=replicated))

  def _under_mesh(self, fn):
    """Runs ``fn`` with this run's mesh set (the ring kernel reads it)."""
    def wrapped(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)
    return wrapped

  def batch(self, arrays):
    """Numpy batch -> global arrays split over the data axis."""
    return sharding.put_batch(arrays, self.mesh)

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in
               jax.tree_util.tree_leaves(self.initial_state.params))

  def evaluate(self, state) -> Dict[str, float]:
    """Metrics of ``state`` over the whole eval split (every example counted
    once), and the task's ``corpus_metrics`` of all its predictions."""
    totals: Dict[str, float] = {}
    model_variables = variables(state)
    corpus = self.task.corpus_metrics is not None
    predictions, labels = [], []
    for batch in data_lib.eval_batches(self.data.eval, self.eval_batch_size):
      sums = jax.device_get(self.eval_step(model_variables, self.batch(batch)))
      if corpus:
        sums, predicted = sums
        real = batch["weight"] > 0                # not the last batch's filling
        predictions.append(np.asarray(predicted)[real])
        labels.append(np.asarray(batch["label"])[real])
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    metrics = {k: v / count for k, v in totals.items()}
    if corpus:
      metrics.update(self.task.corpus_metrics(np.concatenate(predictions),
                                              np.concatenate(labels), self.data.vocabulary))
    return metrics


def _checkpoints(config, workdir):
  return checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoints)


def train_and_evaluate(config, workdir: str, *,
                       stop_after: Optional[int] = None) -> Dict[str, float]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Args:
    config: an experiment ConfigDict (see ``experiments/``).
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard logs, pictures and
      ``results.json`` go here.
    stop_after: stop (with a checkpoint) once this step is reached, as if
      the run were interrupted there; used to test resuming.

  Returns:
    The final evaluation metrics (also in ``WORKDIR/results.json``), or the
    last logged training metrics when stopped early.

  Raises:
    validation.ConfigError: (a ValueError) one line per bad config value,
      before anything is created in ``workdir``.
  """
  validation.validate(config)
  validation.validate_devices(config)
  check_workdir(workdir)
  with jax.debug_nans(bool(config.debug_nans)):
    return _train_and_evaluate(config, workdir, stop_after)


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and proves it writable before any work starts.

  Raises:
    WorkdirError: naming the directory and the operating system's reason.
  """
  probe = os.path.join(workdir, f".write_test_{socket.gethostname()}_{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"work directory {workdir!r} is not usable: "
                       f"{e.strerror or e} ({type(e).__name__})") from e


class WorkdirError(OSError):
  """The work directory cannot be created or written."""


def _train_and_evaluate(config, workdir, stop_after):
  trainer = Trainer(config)
  logging.info("%s: model %s with %s parameters; %d train / %d eval examples",
               config.experiment, config.model.name, f"{trainer.num_params():,}",
               trainer.data.train.size, len(trainer.data.eval["label"]))
  ckpts = _checkpoints(config, workdir)
  writer = None
  try:
    state, record = trainer.initial_state, {"elapsed_s": 0.0}
    if ckpts.latest_step() is not None:
      state, record = ckpts.restore_newest_readable(trainer.initial_state)
      logging.info("resumed from step %d in %s", int(state.step), ckpts.directory)
    # Written only once the checkpoint (if any) fits this config.
    if sharding.is_writer():
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    writer = progress_lib.Writer(workdir) if sharding.is_writer() else progress_lib.NullWriter()
    writer.history.truncate_after(int(state.step))
    return _train(trainer, state, record, ckpts, writer, workdir, stop_after)
  finally:
    if writer is not None:
      writer.close()
    ckpts.close()


def _train(trainer, state, record, ckpts, writer, workdir, stop_after):
  """The loop proper: steps, logs, evaluations, checkpoints, then ``finish``."""
  config = trainer.config
  step = int(state.step)
  progress = progress_lib.Progress(config.total_steps, step, record["elapsed_s"])

  def save(step):
    ckpts.save(step, state, {"elapsed_s": progress.elapsed(),
                             "experiment": config.experiment})

  pending = []  # (step, metrics) since the last log line, still on device
  metrics: Dict[str, float] = {}
  # Leaving this block for any reason (the end, a stop, an error,
  # KeyboardInterrupt) stops the prefetch thread and waits for it.
  with preemption.Listener() as stop_signal, pipeline.Prefetcher(
      trainer.data.train, start=step, stop=config.total_steps,
      depth=config.data.prefetch) as batches:
    while step < config.total_steps:
      state, step_metrics = trainer.train_step(state, trainer.batch(batches.get(step)))
      step += 1
      pending.append((step, step_metrics))
      logging_now = step % config.log_every == 0 or step == config.total_steps
      saving_now = step % config.checkpoint_every == 0 or step == config.total_steps
      if logging_now or saving_now:
        # Checked before any save, so the newest checkpoint is always finite.
        rows = _check_finite(pending)
      if logging_now:
        metrics = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[0][1]}
        pending = []
        writer.scalars("train", step, metrics)
        logging.info("%s", progress.line(step, metrics))
      asked = stop_after is not None and step >= stop_after
      signalled = stop_signal.received(step, every=config.log_every)
      # A signalled run skips the evaluation: the grace period is for saving.
      if step % config.eval_every == 0 and step < config.total_steps and not signalled:
        eval_metrics = trainer.evaluate(state)
        writer.scalars("eval", step, eval_metrics)
        logging.info("eval at step %d: %s", step, _fmt(eval_metrics))
        _to_tensorboard(writer, step, _draw_eval_examples(trainer, state, _attention_dir(workdir)))
      if saving_now:
        save(step)
      if (asked or signalled) and step < config.total_steps:
        if not saving_now:
          _check_finite(pending)
          save(step)
        ckpts.wait()                       # on disk before the log line says so
        writer.flush()
        why = f"on {stop_signal.name}" if signalled else "as asked"
        logging.info("stopped at step %d %s; checkpoint saved, rerun the same command "
                     "to resume", step, why)
        return {**metrics, "stopped_at_step": step, "stopped_by": why}

  if ckpts.latest_step() != step:
    save(step)
  # results.json only ever sits beside a final checkpoint that is on disk.
  ckpts.wait()
  return finish(trainer, state, workdir, writer, progress.elapsed())


def finish(trainer: Trainer, state, workdir: str, writer, elapsed: float):
  """Final evaluation, ``results.json`` and pictures."""
  config = trainer.config
  step = int(state.step)
  eval_metrics = trainer.evaluate(state)
  writer.scalars("eval", step, eval_metrics)
  logging.info("final eval at step %d: %s", step, _fmt(eval_metrics))
  results = {"experiment": config.experiment, "step": step,
             "wall_time_s": round(elapsed, 2), "num_params": trainer.num_params(),
             **{f"eval_{k}": v for k, v in eval_metrics.items()}}
  pictures = _draw_eval_examples(trainer, state, _attention_dir(workdir))   # every process computes
  if sharding.is_writer():
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    history = progress_lib.History(os.path.join(workdir, "metrics.jsonl")).read()
    pictures.update(curves.draw_curves(history, os.path.join(workdir, "curves.png")))
  _to_tensorboard(writer, step, pictures)
  writer.flush()
  logging.info("results in %s; pictures in %s", os.path.join(workdir, "results.json"),
               _attention_dir(workdir))
  return results


def _attention_dir(workdir: str) -> str:
  return os.path.join(workdir, "attention")


def _to_tensorboard(writer, step: int, pictures) -> None:
  for path, image in pictures.items():
    if image is not None:                 # HTML pages have no pixels
      writer.image(index.picture_tag(path), step, image)


def _draw_eval_examples(trainer: Trainer, state, out_dir: str):
  """Runs the model on the first ``config.viz.num_examples`` eval examples and
  hands what it sowed to ``viz.drawers.draw_attention`` (pictures and an
  ``index.html`` in ``out_dir``).

  Returns:
    ``{path: rgb uint8 array}`` of the pictures (for TensorBoard); empty on
    every process but the writer.
  """
  config = trainer.config
  n = min(config.viz.num_examples, len(trainer.data.eval["label"]))
  inputs = _first(trainer.data.eval["inputs"], n)
  labels = np.asarray(trainer.data.eval["label"][:n])
  model_outputs, outputs = jax.device_get(trainer.apply_for_pictures(variables(state), inputs))
  if not sharding.is_writer():
    return {}
  return drawers.draw_attention(
      config.viz.kind, out_dir, f"{config.experiment}, step {int(state.step)}",
      inputs=jax.tree_util.tree_map(np.asarray, inputs), labels=labels,
      predictions=np.asarray(trainer.task.predict(model_outputs)),
      intermediates=outputs.get("intermediates", {}),
      vocabulary=trainer.data.vocabulary, class_names=trainer.data.class_names)


def _restore_latest(config, workdir: str):
  """``(Trainer, state)`` from the newest checkpoint in ``workdir``.

  Raises:
    FileNotFoundError: when ``workdir`` has no checkpoint (nothing is created).
  """
  directory = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))):
    raise FileNotFoundError(f"no checkpoint under {directory}; train first")
  ckpts = _checkpoints(config, workdir)
  try:
    trainer = Trainer(config)
    # Read-only: evaluating or drawing never moves a training run's files.
    state, _ = ckpts.restore_newest_readable(trainer.initial_state, set_aside=False)
  finally:
    ckpts.close()
  return trainer, state


def evaluate_checkpoint(config, workdir: str) -> Dict[str, float]:
  """``--mode=eval``: evaluates the latest checkpoint in ``workdir``.

  Raises:
    validation.ConfigError: a bad config value (one line each).
    FileNotFoundError: when ``workdir`` has no checkpoint.
  """
  validation.validate(config)
  validation.validate_devices(config)
  trainer, state = _restore_latest(config, workdir)
  metrics = trainer.evaluate(state)
  logging.info("eval of step %d: %s", int(state.step), _fmt(metrics))
  if sharding.is_writer():
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"experiment": config.experiment, "step": int(state.step),
                 **{f"eval_{k}": v for k, v in metrics.items()}}, f, indent=2)
  return metrics


def visualize_checkpoint(config, workdir: str):
  """``--mode=visualize``: draws the latest checkpoint's attention into
  ``WORKDIR/attention/`` (pictures and ``index.html``).

  Returns:
    the paths written.

  Raises:
    validation.ConfigError: a bad config value (one line each).
    FileNotFoundError: when ``workdir`` has no checkpoint (nothing is written).
  """
  validation.validate(config)
  validation.validate_devices(config)
  trainer, state = _restore_latest(config, workdir)
  out_dir = _attention_dir(workdir)
  pictures = _draw_eval_examples(trainer, state, out_dir)
  logging.info("drew %d pictures of step %d into %s (open index.html)",
               len(pictures), int(state.step), out_dir)
  return sorted(pictures) + [os.path.join(out_dir, "index.html")]


def predict_checkpoint(config, workdir: str, texts: Sequence[str]) -> List[str]:
  """``--mode=predict``: the latest checkpoint's greedy translation of each of
  ``texts`` (seq2seq over a character vocabulary: dates, number words), or
  for a captioning experiment the caption of each image ``texts`` name (an
  eval-split index or an image file: ``caption_images``), and for speech
  recognition the transcript of each clip they name (an eval-split index or
  a 16 kHz WAV file: ``transcript_clips``).

  Raises:
    validation.ConfigError: a bad config value (one line each).
    ValueError: a task other than seq2seq, captioning or speech_recognition,
      no texts, or a text the model cannot read (a character outside the
      vocabulary, or too long; an index or path that names no image or clip),
      named.
    FileNotFoundError: when ``workdir`` has no checkpoint.
  """
  validation.validate(config)
  validation.validate_devices(config)
  if config.task not in ("seq2seq", "captioning", "speech_recognition"):
    raise ValueError(f"--mode=predict translates text, captions images or transcribes "
                     f"speech: it needs a seq2seq, captioning or speech_recognition "
                     f"experiment, and {config.experiment} is {config.task}")
  if not texts:
    raise ValueError("--mode=predict needs --inputs: the texts to translate (seq2seq), "
                     "eval-split indices or image paths to caption (captioning), or "
                     "eval-split indices or WAV paths to transcribe (speech_recognition)")
  trainer, state = _restore_latest(config, workdir)
  eval_inputs = trainer.data.eval["inputs"]
  if config.task == "captioning":
    source, separator = {"image": caption_images(texts, eval_inputs["image"])}, " "
  elif config.task == "speech_recognition":
    source, separator = {"audio": transcript_clips(texts, eval_inputs["audio"])}, ""
  else:
    source = {"source": character_ids(texts, trainer.data.vocabulary,
                                      eval_inputs["source"].shape[1])}
    separator = ""
  target = np.zeros((len(texts),) + eval_inputs["target"].shape[1:], np.int32)
  outputs = jax.jit(lambda v, x: trainer.model.apply(v, x, train=False))(
      variables(state), {**source, "target": target})
  written = [tasks_lib.token_text(row, trainer.data.vocabulary, separator=separator)
             for row in np.asarray(jax.device_get(trainer.task.predict(outputs)))]
  for text, output in zip(texts, written):
    logging.info("%s -> %s", text, output)
  return written


def transcript_clips(texts: Sequence[str], eval_audio: np.ndarray) -> np.ndarray:
  """The clips ``--inputs`` name, int16 ``[len(texts), samples]`` shaped as
  ``eval_audio``: an integer is that example of the eval split, anything else
  the path of a WAV file at 16 kHz (mono, or its first channel), padded with
  silence at the end to the clip length.

  Raises:
    ValueError: an index outside the eval split, a path that is not a WAV
      file, another sample rate or a recording longer than the clip, named.
  """
  from scipy.io import wavfile   # late: only speech recognition reads WAV files
  count, samples = eval_audio.shape
  out = np.zeros((len(texts), samples), np.int16)
  for row, text in enumerate(texts):
    if text.strip().lstrip("-").isdigit():
      index = int(text)
      if not 0 <= index < count:
        raise ValueError(f"input {text!r}: the eval split has examples 0..{count - 1}")
      out[row] = eval_audio[index]
      continue
    try:
      rate, audio = wavfile.read(text)
    except (OSError, ValueError) as e:
      raise ValueError(f"input {text!r} is neither an eval-split index nor a WAV file "
                       f"({type(e).__name__})") from None
    audio = audio[:, 0] if audio.ndim == 2 else audio
    if rate != 16000:
      raise ValueError(f"input {text!r} is sampled at {rate} Hz; the model hears 16000 Hz")
    if len(audio) > samples:
      raise ValueError(f"input {text!r} lasts {len(audio)} samples, longer than the "
                       f"{samples} of a clip")
    if np.issubdtype(audio.dtype, np.floating):
      audio = np.clip(np.round(audio * 32767.0), -32768, 32767)
    out[row, :len(audio)] = audio.astype(np.int16)
  return out


def caption_images(texts: Sequence[str], eval_images: np.ndarray) -> np.ndarray:
  """The images ``--inputs`` name, ``float32 [len(texts), height, width,
  channels]`` in [0, 1] shaped as ``eval_images``: an integer is that
  example of the eval split, anything else the path of an image file (read
  by Pillow, converted to grey or RGB as the model reads, resized to the
  model's size).

  Raises:
    ValueError: an index outside the eval split, or a path that is not an
      image file, named.
  """
  from PIL import Image   # late: only captioning reads image files
  count, height, width, channels = eval_images.shape
  out = np.zeros((len(texts), height, width, channels), np.float32)
  for row, text in enumerate(texts):
    if text.strip().lstrip("-").isdigit():
      index = int(text)
      if not 0 <= index < count:
        raise ValueError(f"input {text!r}: the eval split has examples 0..{count - 1}")
      out[row] = eval_images[index]
      continue
    try:
      with Image.open(text) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
        pixels = np.asarray(image, np.float32) / 255.0
    except (OSError, ValueError) as e:
      raise ValueError(f"input {text!r} is neither an eval-split index nor an image file "
                       f"({type(e).__name__})") from None
    out[row] = pixels.reshape(height, width, channels)
  return out


def character_ids(texts: Sequence[str], vocabulary: Sequence[str], length: int) -> np.ndarray:
  """``texts`` as ids ``int32 [len(texts), length]`` of their characters in
  ``vocabulary``, padded with id 0.

  Raises:
    ValueError: naming a text with a character outside ``vocabulary`` or
      longer than ``length``.
  """
  ids = {token: i for i, token in enumerate(vocabulary)}
  out = np.zeros((len(texts), length), np.int32)
  for row, text in enumerate(texts):
    unknown = sorted({c for c in text if c not in ids})
    if unknown:
      raise ValueError(f"input {text!r} has characters {unknown} the model never saw")
    if len(text) > length:
      raise ValueError(f"input {text!r} has {len(text)} characters; the model reads at "
                       f"most {length}")
    out[row, :len(text)] = [ids[c] for c in text]
  return out


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or infinity."""


def _check_finite(pending):
  """``pending`` ``[(step, device metrics)]`` fetched to the host, in order.

  Raises:
    NonFiniteError: naming the first step with a non-finite metric and that
      metric; the caller has not saved that state, so the newest checkpoint
      is the last good one.
  """
  rows = [(step, {k: float(v) for k, v in m.items()})
          for step, m in jax.device_get(pending)]
  for step, metrics in rows:
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
      raise NonFiniteError(
          f"non-finite {bad[0]} ({metrics[bad[0]]}) at step {step}; nothing from "
          "that step on was saved, so the newest checkpoint (if any) is the last "
          "good one; rerun with "
          "--config.debug_nans=True to stop at the operation that made it")
  return rows


def _fmt(metrics: Dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
