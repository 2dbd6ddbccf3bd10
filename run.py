"""Entry point: ``python run.py --experiment=NAME --workdir=DIR [--mode=train|eval|visualize]``.

Any config field can be overridden: ``--config.total_steps=100``,
``--config.model.kernel=reference``. The experiment's config is loaded before
flags are parsed, so overrides are checked against its real fields: an
unknown key exits non-zero naming it.
"""

import os
import sys

# TensorFlow only feeds data here: keep it off accelerators so JAX owns their memory.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import experiments  # noqa: E402

MODES = ("train", "eval", "visualize")


def _experiment_from_argv(argv):
  """Reads ``--experiment`` before absl parses flags (the config depends on it)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--experiment="):
      return arg.split("=", 1)[1]
    if arg == "--experiment" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _define_flags(argv):
  name = _experiment_from_argv(argv)
  if name is None:
    sys.exit(f"error: --experiment is required; available experiments: "
             f"{', '.join(experiments.names())}")
  try:
    config = experiments.get_config(name)
  except ValueError as e:
    sys.exit(f"error: {e}")
  config.lock()  # an override of a field that does not exist is an error
  flags.DEFINE_string("experiment", None, "experiment name (experiments/NAME.py)")
  flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, pictures")
  flags.DEFINE_enum("mode", "train", MODES, "train (resumes), eval (latest checkpoint) or visualize "
                    "(latest checkpoint's attention pictures into WORKDIR/attention)")
  config_flags.DEFINE_config_dict("config", config, "experiment config; override fields with --config.a.b=value")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # imported late: flag errors should not wait for it
  tf.config.set_visible_devices([], "GPU")
  from attention_lab import train

  config = flags.FLAGS.config
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
              "visualize": train.visualize_checkpoint}[flags.FLAGS.mode]
  try:
    run_mode(config, workdir)
  except (FileNotFoundError, train.WorkdirError, train.CheckpointError,
          train.NonFiniteError) as e:
    # Faults with a clear cause end in one line, not a traceback: saved
    # checkpoints are untouched (see README, "Faults").
    sys.exit(f"error: {e}")


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
