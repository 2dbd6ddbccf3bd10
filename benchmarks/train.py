"""Training throughput of a Transformer on this machine: steps/s, model FLOP
utilisation against the measured matmul peak, and the attention kernel's share.

    python benchmarks/train.py                       # 4 layers, width 256, 8 heads; 256 and 2,048 tokens
    python benchmarks/train.py --quick               # tiny sizes: checks the script runs
    python benchmarks/train.py --lengths=1024 --threads=1
    python benchmarks/train.py --experiments=all     # every experiment's default config
    python benchmarks/train.py --experiments=mnist_vit,dates_luong --quick

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

With ``--experiments`` (names from ``experiments/``, or ``all``) it times each
experiment's real default config instead: ``loop.Trainer`` builds its model,
offline input pipeline and jitted train step, exactly as ``run.py`` would,
and for each experiment it measures

- step: the jitted train step alone on one fixed batch: ``--loop_steps``
  calls back to back, blocked on the last one's result (so the host's
  dispatch of a step overlaps the device's work on the one before, as in the
  loop), per step;
- input: the input pipeline alone, the batch of the next step
  (``data.train(step)``, the function the loop's prefetch thread calls) and
  its transfer to the device (``Trainer.batch``);
- attention: every ``kernels.dot_product_attention`` call of the step,
  recorded while the step is traced, re-run forward and backward (gradients
  of query, key and value) at its shapes and with its options, identical
  calls run in a row as often as the step makes them (each blocked on), every
  shape's run a candidate of the rotation; array arguments are replaced by their
  least restrictive values (lengths full, masks all True, biases zero): the
  CPU kernels apply lengths and dense masks without skipping work for them,
  so the cost is that of the step's shapes (block skipping comes from
  ``is_causal``, windows and ``mask_mod``, which are kept); a call whose
  ``score_mod`` or ``mask_mod`` closes over the step's own arrays cannot run
  alone and is named instead;
- loop: the training loop itself (``loop._train``, the one every run goes
  through, with the config's prefetch depth) for ``--loop_steps`` steps per
  interval, timed between its metric logs (``log_every`` is set to the
  interval; evaluations and checkpoints are moved past the end), the first
  interval dropped as warm-up.

Step, input and attention rotate through ``--repeats`` rounds after
``--warmup`` untimed calls; the loop's intervals follow in one block. Shares
are of the loop's time per step: ``step`` is the jitted step's, ``loop`` the
rest (``loop - step``: host work the loop does not hide, the transfer of the
batch, dispatch, the metric syncs at each log; the two add up to 1), and
``attention`` a part of ``step``. ``input`` is the pipeline's own time: it
runs on the prefetch thread, so its share need not add to the others (it is
hidden while it stays below ``step``, and on a 2-CPU machine it still takes
CPU time from XLA's threads).

Model FLOPs (MFU) for experiments: the flops XLA's cost analysis reports for
the compiled train step (``jit(...).lower(...).compile().cost_analysis()``),
all of them, not only matrix products: elementwise work, reductions and the
optimizer update count too. XLA counts a while loop's body once whatever its
trip count (measured: ten 256x256 products in a ``fori_loop`` report the
flops of one; ``blockwise``'s forward+backward at 2,048 tokens reports 0.96
GFLOP against 51.5 for its products), so the step is lowered for counting with
every attention call on the ``reference`` kernel (dense, loop-free: the
model's attention FLOPs without recomputation); an experiment whose step still
has while loops (recurrent encoders and decoders; not the five-round loop of
``jax.random``'s threefry hash, which dropout runs) prints ``>=``: its count
is a lower bound. MFU is those flops per loop step over the measured
matmul peak.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

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
flags.DEFINE_list("experiments", [], "experiment names (experiments/), or 'all': time each "
                  "one's default config (step, input, loop, attention) instead of the "
                  "Transformer table")
flags.DEFINE_integer("warmup", 2, "experiments: untimed calls of each candidate first")
flags.DEFINE_integer("loop_steps", 3, "experiments: training-loop steps per timed interval")
flags.DEFINE_float("budget_s", 30.0, "experiments: one whose steps would take longer than "
                   "this (estimated from one step) is listed, not timed")
flags.DEFINE_list("exclude", [], "experiments: names listed as not timed (with --experiments=all)")
flags.DEFINE_integer("batch_size", 0, "experiments: override config.batch_size; 0: the "
                     "config's (--quick: 4)")
FLAGS = flags.FLAGS

QUICK = {"lengths": ["64"], "tokens_per_step": 256, "layers": 1, "width": 32, "heads": 2,
         "mlp": 64, "repeats": 3, "peak_size": 256, "warmup": 1, "loop_steps": 2,
         "batch_size": 4}


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


class _AttentionCalls:
  """Records each ``kernels.dot_product_attention`` call made while a
  function is traced, and sends it to the ``reference`` kernel (dense and
  loop-free, so XLA's cost analysis counts all of its FLOPs).

  Use as a context manager around a lowering; ``calls`` then holds
  ``(args, kwargs)`` with arrays replaced by ``jax.ShapeDtypeStruct``.
  """

  def __init__(self):
    from attention_lab import kernels
    self.kernels = kernels
    self.original = kernels.dot_product_attention
    self.calls: List[Tuple[tuple, dict]] = []
    self.problems: List[str] = []

  def _record(self, *args, **kwargs):
    import jax
    # jax exports no public BatchTracer; the name is what vmap traces with.
    if any(type(x).__name__ == "BatchTracer" for x in jax.tree_util.tree_leaves((args, kwargs))):
      self.problems.append("a call under vmap (its batch axis is not in the traced shapes)")
    shape = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype)
                       if hasattr(x, "shape") and hasattr(x, "dtype") else x)
    self.calls.append((tuple(shape(a) for a in args),
                       {k: shape(v) for k, v in kwargs.items()}))
    reference = dict(kwargs, implementation="reference")
    return self.original(*args, **reference)

  def __enter__(self):
    self.kernels.dot_product_attention = self._record
    return self

  def __exit__(self, *exc):
    self.kernels.dot_product_attention = self.original
    return False


_POSITIONAL = ("query", "key", "value", "bias", "mask")


def _attention_candidate(args, kwargs, original, times: int = 1):
  """A zero-argument callable running one recorded attention call forward
  and backward (gradients of query, key and value) on random inputs, with
  array arguments at their least restrictive values, ``times`` times in a
  row (each blocked on: no two overlap).

  Raises:
    ValueError: an array argument with no neutral value, named.
  """
  import jax
  import jax.numpy as jnp
  named = dict(zip(_POSITIONAL, args), **kwargs)
  query, key, value = (named.pop(n) for n in _POSITIONAL[:3])
  length = {"q_lengths": query.shape[-3], "query_seq_lengths": query.shape[-3],
            "kv_lengths": key.shape[-3], "key_value_seq_lengths": key.shape[-3]}
  fixed = {}
  for name, x in named.items():
    if not isinstance(x, jax.ShapeDtypeStruct):
      fixed[name] = x
    elif name in length:
      fixed[name] = jnp.full(x.shape, length[name], x.dtype)
    elif name == "mask":
      fixed[name] = jnp.ones(x.shape, x.dtype)
    elif name == "bias":
      fixed[name] = jnp.zeros(x.shape, x.dtype)
    elif name == "dropout_rng":
      fixed[name] = (jax.random.key(0) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else jax.random.PRNGKey(0))
    else:
      raise ValueError(f"array argument {name} {x.shape} has no neutral value")

  def total(q, k, v):
    out = original(q, k, v, **fixed)
    return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32).sum()

  grad = jax.jit(jax.grad(total, (0, 1, 2)))
  inputs = [jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(jax.random.split(jax.random.key(3), 3), (query, key, value))]

  def run():
    for _ in range(times):
      jax.block_until_ready(grad(*inputs))
  return run


# The op_name of a while loop inside one of jax.random's functions (seen:
# dropout's ".../jit(_bernoulli)/jit(_uniform)/while"; others name
# "_threefry_split" or "_threefry_fold_in" anywhere in the path).
_RANDOM_LOOP = re.compile(r"jit\((_threefry\w*|_uniform|_bernoulli|_randint|_normal\w*|"
                          r"_truncated_normal|_gumbel|_random_bits)\)/while")


def _step_flops(trainer, state, batch) -> Tuple[float, bool, List[Tuple[tuple, dict]], List[str]]:
  """``(XLA flops of one train step, True when while loops remain, the
  attention calls of the step, problems recording them)``; see the module
  docstring for why attention is lowered on ``reference`` here."""
  import jax
  # A fresh jit of the un-jitted step: its trace (reference attention) must
  # never be the one the timed step reuses from jit's cache.
  fresh = jax.jit(lambda s, b: trainer.train_step_fn(s, b))
  with _AttentionCalls() as recorder, jax.set_mesh(trainer.mesh):
    compiled = fresh.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # jax.random's threefry hash runs its five rounds as a while loop on CPU
  # (integer mixing of random bits, not model FLOPs); any other loop (a
  # recurrent model's scan) makes the count a lower bound.
  has_while = any(" while(" in line and "threefry" not in line
                  and not _RANDOM_LOOP.search(line)
                  for line in compiled.as_text().splitlines())
  return float(cost.get("flops", 0.0)), has_while, recorder.calls, recorder.problems


def _loop_clock():
  """A metric writer that writes nothing (``progress.NullWriter``) and notes
  the time of each train log (the loop has just fetched that interval's
  metrics, so every step before it has finished)."""
  from attention_lab.train import progress

  class LoopClock(progress.NullWriter):

    def __init__(self):
      self.times: List[float] = []

    def scalars(self, split, step, metrics):
      del step, metrics
      if split == "train":
        self.times.append(time.perf_counter())

  return LoopClock()


def _offline_reason(config) -> Optional[str]:
  """Why ``config`` cannot be timed here, or None."""
  from attention_lab import data as data_lib
  from attention_lab.data import sources
  source = data_lib.get_spec(config.data.name).source
  if source.partition("/")[0] not in sources.LOCAL_BUILDERS:
    return (f"needs the online dataset {source!r} (tfds.load; this machine has no "
            "network, and no offline builder serves it)")
  return None


def _time_experiment(name: str, peak: float) -> str:
  """One table row for experiment ``name`` (or a line saying why not)."""
  import jax
  import numpy as np

  import experiments
  from attention_lab.train import loop
  from attention_lab.train import validation

  config = experiments.get_config(name)
  validation.validate(config)
  reason = _offline_reason(config)
  if reason:
    return f"| {name} | skipped: {reason} |"
  rounds, interval = FLAGS.repeats, FLAGS.loop_steps
  with config.unlocked():
    if FLAGS.batch_size:
      config.batch_size = FLAGS.batch_size
    # Loop cadence only: the model, data, optimizer and step are the default
    # config's. A log per interval is the clock; no evaluation or checkpoint
    # falls inside the timed steps.
    config.log_every = interval
    config.eval_every = config.checkpoint_every = 1 << 30
  started = time.perf_counter()
  trainer = loop.Trainer(config)
  built_s = time.perf_counter() - started
  state = trainer.initial_state
  fixed_batch = trainer.batch(trainer.data.train(0))
  flops, has_while, calls, problems = _step_flops(trainer, state, fixed_batch)

  holder = [state]
  for _ in range(2):       # compiles, then one step as it runs
    started = time.perf_counter()
    holder[0], metrics = trainer.train_step(holder[0], fixed_batch)
    jax.block_until_ready((holder[0], metrics))
  one_step_s = time.perf_counter() - started
  # Steps this timing runs: warm-ups and rounds of the step (an interval
  # each), and the loop's intervals (one dropped).
  steps = (FLAGS.warmup + 1 + rounds) * interval + (rounds + 1) * interval
  if one_step_s * steps > FLAGS.budget_s:
    return (f"| {name} | not timed: one step takes {one_step_s:.1f} s, so its {steps} timed "
            f"steps would take about {one_step_s * steps:.0f} s (over --budget_s="
            f"{FLAGS.budget_s:g}; fewer --repeats / --loop_steps, or a larger budget) |")

  def step():
    # Back to back, blocked once, as the loop dispatches them: the host's
    # dispatch of one step overlaps the device's work on the one before.
    for _ in range(interval):
      holder[0], metrics = trainer.train_step(holder[0], fixed_batch)
    jax.block_until_ready((holder[0], metrics))

  next_step = [1]

  def input_pipeline():
    jax.block_until_ready(trainer.batch(trainer.data.train(next_step[0])))
    next_step[0] += 1

  from attention_lab import kernels
  groups: Dict[str, Tuple[int, tuple, dict]] = {}
  for args, kwargs in calls:
    signature = repr((args, sorted(kwargs.items())))
    count = groups[signature][0] + 1 if signature in groups else 1
    groups[signature] = (count, args, kwargs)
  candidates = {"step": step, "input": input_pipeline}
  multiplier = {}
  for i, (count, args, kwargs) in enumerate(groups.values()):
    try:
      # The step's calls of one shape in a row, as its layers make them: a
      # single call timed right after another candidate ran slower (measured
      # on listops_transformer's: 47 ms median rotated with the step, 37 ms
      # alone), which the repeats amortise as the step's layers do.
      candidates[f"attention {i}"] = _attention_candidate(
          args, kwargs, kernels.dot_product_attention, times=count)
      multiplier[f"attention {i}"] = count
    except ValueError as e:
      problems.append(str(e))
  for key, fn in list(candidates.items()):
    try:
      for _ in range(FLAGS.warmup):
        fn()
    except Exception as e:  # noqa: BLE001: a call that cannot run alone is named
      if not key.startswith("attention"):
        raise
      del candidates[key]
      if isinstance(e, jax.errors.UnexpectedTracerError):
        problems.append("a score_mod / mask_mod closes over the step's own arrays (a learned "
                        "table: the call cannot run outside the step)")
      else:
        problems.append((str(e).strip().splitlines() or [type(e).__name__])[0][:120])
  spreads, failed = timing.time_rotating(candidates, rounds)
  problems += list(failed.values())

  clock = _loop_clock()
  workdir = tempfile.mkdtemp(prefix="train_benchmark_")
  ckpts = loop._checkpoints(config, workdir)
  try:
    start = int(holder[0].step)
    loop._train(trainer, holder[0], {"elapsed_s": 0.0}, ckpts, clock, workdir,
                stop_after=start + (rounds + 1) * interval)
  finally:
    ckpts.close()
    shutil.rmtree(workdir, ignore_errors=True)
  loop_spread = timing.Spread(tuple(float(t) / interval for t in np.diff(clock.times)))
  loop_s = loop_spread.median
  spreads["step"] = timing.Spread(tuple(t / interval for t in spreads["step"].times))
  step_s, input_s = spreads["step"].median, spreads["input"].median
  attention_s = sum(spreads[k].median for k in multiplier if k in spreads)
  batch = config.batch_size
  timed = [k for k in multiplier if k in spreads]
  untimed = sum(n for k, n in multiplier.items() if k not in spreads) + sum(
      count for i, (count, _, _) in enumerate(groups.values())
      if f"attention {i}" not in multiplier)
  if not calls:
    attention = "none (no dot-product kernel call)"
    attention_ms = "-"
  elif problems:
    calls_text = f"{untimed} of {len(calls)} calls not timed"
    attention = (f"not timed: {calls_text}: {'; '.join(sorted(set(problems)))}" if not timed
                 else f"at least {attention_s / loop_s:.2f} ({calls_text}: "
                      f"{'; '.join(sorted(set(problems)))})")
    attention_ms = f"{attention_s * 1e3:.1f}" if timed else "-"
  else:
    attention = f"{attention_s / loop_s:.2f}"
    attention_ms = f"{attention_s * 1e3:.1f} ({sum(multiplier.values())} calls)"
  bound = ">=" if has_while else ""
  print(f"({name}: built in {built_s:.1f} s, {len(clock.times) - 1} loop intervals)",
        file=sys.stderr, flush=True)
  return (f"| {name} | {batch} | {loop_spread.ms()} | {1 / loop_s:.2f} | {batch / loop_s:.0f} | "
          f"{bound}{flops / 1e9:.4g} | {bound}{flops / loop_s / 1e9 / peak:.3f} | "
          f"{spreads['step'].ms()} | {spreads['input'].ms()} | {attention_ms} | "
          f"{step_s / loop_s:.2f} | {(loop_s - step_s) / loop_s:.2f} | {input_s / loop_s:.2f} | "
          f"{attention} |")


def _experiments_table(peak: float) -> None:
  import gc

  import jax
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")    # as run.py: TensorFlow only feeds data
  import experiments
  names = experiments.names() if FLAGS.experiments == ["all"] else FLAGS.experiments
  unknown = sorted((set(names) | set(FLAGS.exclude)) - set(experiments.names()))
  if unknown:
    raise app.UsageError(f"--experiments: unknown {', '.join(unknown)}; available: "
                         f"{', '.join(experiments.names())}")
  print(f"Experiments, default configs{f' at batch {FLAGS.batch_size}' if FLAGS.batch_size else ''}"
        f": ms as median (min-max) of {FLAGS.repeats} rounds after {FLAGS.warmup} "
        f"warm-up calls, order rotated; loop: median of {FLAGS.repeats} intervals of "
        f"{FLAGS.loop_steps} steps; shares of the loop's time per step")
  header = ("| experiment | batch | loop ms/step | steps/s | examples/s | XLA GFLOP/step | "
            "MFU | step ms | input ms | attention ms | step share | loop share | "
            "input share | attention share |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1), flush=True)
  for name in names:
    if name in FLAGS.exclude:
      print(f"| {name} | not timed: --exclude |", flush=True)
      continue
    print(_time_experiment(name, peak), flush=True)
    gc.collect()            # one experiment's data and buffers before the next's
    jax.clear_caches()


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
  if FLAGS.experiments:
    _experiments_table(peak)
    return
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
