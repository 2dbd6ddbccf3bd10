"""Training throughput of a Transformer on this machine: steps/s, model FLOP
utilisation against the measured matmul peak, and the attention kernel's share.

    python benchmarks/train.py                       # 4 layers, width 256, 8 heads; 256 and 2,048 tokens
    python benchmarks/train.py --quick               # tiny sizes: checks the script runs
    python benchmarks/train.py --lengths=1024 --threads=1

Each length trains the text Transformer (``models.build``, the same model
``listops_transformer`` uses) on random tokens with AdamW, a fixed number of
tokens per step, through the project's default attention dispatch. Model
FLOPs are counted analytically (matrix products only, forward x 3 for the
backward): per token and layer ``2 (4 d^2 + 2 d m)`` for the projections and
the MLP and ``4 T d`` for scores and values (full attention). The kernel
share is the time of the attention call alone (forward and backward, at the
step's shapes, times the layers) over the step time. Steps, the attention
call and the matmul peak are timed side by side in one process, rounds
rotated, medians with their spread.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import timing  # noqa: E402

flags.DEFINE_list("lengths", ["256", "2048"], "sequence lengths")
flags.DEFINE_integer("tokens_per_step", 8192, "batch = tokens_per_step // length")
flags.DEFINE_integer("layers", 4, "Transformer blocks")
flags.DEFINE_integer("width", 256, "model width")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("mlp", 1024, "MLP width")
flags.DEFINE_integer("repeats", 5, "timed rounds (median, min-max)")
flags.DEFINE_integer("threads", 0, "CPUs to pin the process to; 0: all it may use")
flags.DEFINE_integer("peak_size", 2048, "side of the square matmul that measures the peak")
flags.DEFINE_bool("quick", False, "tiny sizes and few rounds (seconds): checks the script runs")
FLAGS = flags.FLAGS

QUICK = {"lengths": ["64"], "tokens_per_step": 256, "layers": 1, "width": 32, "heads": 2,
         "mlp": 64, "repeats": 3, "peak_size": 256}


def model_flops(tokens: int, length: int, layers: int, width: int, mlp: int) -> float:
  """Training FLOPs of one step (matrix products; backward = 2 x forward)."""
  per_token_layer = 2 * (4 * width * width + 2 * width * mlp) + 4 * length * width
  return 3.0 * tokens * layers * per_token_layer


def _step_and_attention(length: int):
  """A jitted AdamW training step of the model and its attention call alone,
  each as a zero-argument callable over fixed random inputs."""
  import jax
  import jax.numpy as jnp
  import optax

  from attention_lab import kernels
  from attention_lab import models

  batch = max(FLAGS.tokens_per_step // length, 1)
  model = models.build(dict(
      name="text_transformer", num_classes=10, vocab_size=256, hidden_dim=FLAGS.width,
      num_layers=FLAGS.layers, num_heads=FLAGS.heads, mlp_dim=FLAGS.mlp, pool="mean",
      dtype="float32"))
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 3, 256)
  labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  params = model.init(jax.random.key(2), tokens)["params"]
  optimizer = optax.adamw(1e-3)

  def loss(params):
    logits = model.apply({"params": params}, tokens, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state = [params, optimizer.init(params)]

  def train_step():
    state[:] = step(*state)
    jax.block_until_ready(state[0])

  head_dim = FLAGS.width // FLAGS.heads
  q, k, v = (jax.random.normal(key, (batch, length, FLAGS.heads, head_dim))
             for key in jax.random.split(jax.random.key(3), 3))
  lengths = jnp.full((batch,), length, jnp.int32)    # the text model passes its padding so
  attend = jax.jit(jax.grad(lambda q, k, v: kernels.dot_product_attention(
      q, k, v, kv_lengths=lengths).sum(), (0, 1, 2)))

  def attention():
    jax.block_until_ready(attend(q, k, v))

  return train_step, attention, batch


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.quick:
    timing.apply_quick(FLAGS, QUICK)
  threads, cpus = timing.pin_threads(FLAGS.threads)   # before JAX sizes its pool
  import jax

  print(f"machine: {timing.cpu_description()}; {len(cpus)} of {os.cpu_count()} CPUs used; "
        f"jax {jax.__version__} on {jax.default_backend()}")
  print(timing.tuning_line())
  if FLAGS.quick:
    print("(--quick: tiny sizes and rounds; these numbers only show that the script runs)")
  peak_spread = timing.matmul_peak(FLAGS.peak_size, FLAGS.repeats)
  peak = timing.peak_gflops(peak_spread, FLAGS.peak_size)
  print(f"XLA float32 matmul peak: {FLAGS.peak_size}x{FLAGS.peak_size}: {peak:.0f} GFLOP/s "
        f"({peak_spread.ms()} ms)")
  print(f"Transformer: {FLAGS.layers} layers, width {FLAGS.width}, {FLAGS.heads} heads, "
        f"MLP {FLAGS.mlp}, float32, AdamW; {FLAGS.tokens_per_step} tokens per step; "
        f"ms as median (min-max) of {FLAGS.repeats} rounds, order rotated")
  header = ("| length | batch | step ms | steps/s | model GFLOP/s | MFU | "
            "attention ms (x layers) | attention share |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1), flush=True)
  for length in (int(x) for x in FLAGS.lengths):
    train_step, attention, batch = _step_and_attention(length)
    spreads, failed = timing.time_rotating({"step": train_step, "attention": attention},
                                           FLAGS.repeats)
    if failed:
      print(f"| {length} | {batch} | failed: {failed} |")
      continue
    step_s = spreads["step"].median
    flops = model_flops(batch * length, length, FLAGS.layers, FLAGS.width, FLAGS.mlp)
    achieved = flops / step_s / 1e9
    attention_s = spreads["attention"].median * FLAGS.layers
    print(f"| {length} | {batch} | {spreads['step'].ms()} | {1 / step_s:.2f} | "
          f"{achieved:.0f} | {achieved / peak:.2f} | {attention_s * 1e3:.1f} | "
          f"{attention_s / step_s:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
