"""Entry point: ``python run.py --experiment=NAME --workdir=DIR [--mode=train|eval|visualize|predict]``.

Any config field can be overridden: ``--config.total_steps=100``,
``--config.model.attention.kernel=reference``. The experiment's config is loaded before
flags are parsed, so overrides are checked against its real fields, and the
whole config is validated (``attention_lab/train/validation.py``) before
TensorFlow or JAX start and before anything is written to the workdir. Each
problem is one line (the field, its value, what is allowed, and "did you
mean" for a mistyped key); the exit status is then 2.
"""

import os
import re
import sys

# TensorFlow only feeds data here: keep it off accelerators so JAX owns their memory.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import experiments  # noqa: E402

MODES = ("train", "eval", "visualize", "predict")
CONFIG_ERROR_STATUS = 2   # a usage error, as for flags absl rejects


def _exit_config_errors(lines):
  """Ends the program with one ``error:`` line per problem: no traceback."""
  sys.stderr.write("".join(f"error: {line}\n" for line in lines))
  sys.exit(CONFIG_ERROR_STATUS)


def _experiment_from_argv(argv):
  """Reads ``--experiment`` before absl parses flags (the config depends on it)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--experiment="):
      return arg.split("=", 1)[1]
    if arg == "--experiment" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_overrides(argv):
  """``[(dotted path, value or None)]`` of the ``--config.a.b=value`` flags in
  ``argv``, read as ml_collections reads them (``--noconfig.a`` sets False)."""
  overrides = []
  for i, arg in enumerate(argv):
    match = re.match(r"^--?(no)?config\.([^=]+)(?:=(.*))?$", arg)
    if not match:
      continue
    negated, path, value = match.groups()
    if value is None and not negated and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
      value = argv[i + 1]
    overrides.append((path, "False" if negated else value))
  return overrides


def _check_override_keys(argv, config):
  """Exits with one line per override of a field the config lacks.

  ml_collections would raise a KeyError deep in flag definition; this names
  the field and the closest real ones instead.
  """
  from attention_lab.train import validation
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)   # --flagfile too
  unknown = [validation.unknown_key(path, value, config)
             for path, value in _config_overrides(argv)
             if not validation.has_key(config, path)]
  if unknown:
    _exit_config_errors(unknown)


def _define_flags(argv):
  name = _experiment_from_argv(argv)
  if name is None:
    sys.exit(f"error: --experiment is required; available experiments: "
             f"{', '.join(experiments.names())}")
  try:
    config = experiments.get_config(name)
  except ValueError as e:
    sys.exit(f"error: {e}")
  _check_override_keys(argv, config)
  config.lock()  # an override of a field that does not exist is an error
  flags.DEFINE_string("experiment", None, "experiment name (experiments/NAME.py)")
  flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, pictures")
  flags.DEFINE_enum("mode", "train", MODES, "train (resumes), eval (latest checkpoint), visualize "
                    "(latest checkpoint's attention pictures into WORKDIR/attention) or "
                    "predict (translations of --inputs by the latest checkpoint; seq2seq, "
                    "captions of them; captioning, or transcripts; speech_recognition)")
  flags.DEFINE_multi_string("inputs", [], "--mode=predict: a text to translate, an "
                            "eval-split index or image path to caption, or an eval-split "
                            "index or 16 kHz WAV path to transcribe; repeat the flag "
                            "for more")
  try:
    config_flags.DEFINE_config_dict("config", config,
                                    "experiment config; override fields with --config.a.b=value")
  except (AttributeError, KeyError) as e:   # an unknown key _check_override_keys missed
    _exit_config_errors([f"a --config override names no field of {name}'s config: {e}"])
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from attention_lab.train import validation
  config = flags.FLAGS.config
  # Before TensorFlow, JAX devices or the workdir: a bad value costs nothing.
  problems = validation.problems(config)
  if problems:
    _exit_config_errors(problems)
  import tensorflow as tf  # imported late: flag errors should not wait for it
  tf.config.set_visible_devices([], "GPU")
  from attention_lab import train

  workdir = flags.FLAGS.workdir
  if config.distributed:
    import jax
    # Reads the cluster from the environment (TPU pod slices, SLURM, or
    # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    jax.distributed.initialize()
    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)   # one log, from the first process
  logging.info("experiment %s, mode %s, workdir %s\n%s", config.experiment,
               flags.FLAGS.mode, workdir, config)
  run_mode = {"train": train.train_and_evaluate, "eval": train.evaluate_checkpoint,
              "visualize": train.visualize_checkpoint,
              "predict": _predict}[flags.FLAGS.mode]
  from attention_lab.data.sources import SplitError
  try:
    run_mode(config, workdir)
  except train.ConfigError as e:
    # What only the devices show (the mesh, a kernel for another platform).
    _exit_config_errors(e.lines)
  except (FileNotFoundError, SplitError, train.WorkdirError, train.CheckpointError,
          train.NonFiniteError) as e:
    # Faults with a clear cause end in one line, not a traceback: saved
    # checkpoints are untouched (see docs/running.md, "Faults").
    sys.exit(f"error: {e}")


def _predict(config, workdir):
  """Prints ``input -> translation``, one line per ``--inputs``."""
  from attention_lab import train
  texts = flags.FLAGS.inputs
  try:
    translations = train.predict_checkpoint(config, workdir, texts)
  except train.ConfigError:
    raise                              # main's handler: one line per problem
  except ValueError as e:
    sys.exit(f"error: {e}")
  for text, translation in zip(texts, translations):
    print(f"{text} -> {translation}")


class _QuietLibraries:
  """Keeps the log about the run: drops orbax's and TFDS's INFO chatter."""
  NOISY = ("orbax", "tensorflow_datasets", "xla_bridge")

  def filter(self, record):
    return (record.levelno > 20 or  # python logging INFO
            not any(n in record.pathname for n in self.NOISY))


if __name__ == "__main__":
  _define_flags(sys.argv)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  app.run(main)
